//! Access control: which identity may publish, subscribe, register and take
//! over what.
//!
//! Sans-IO: the `[access]` configuration is compiled once into an
//! [`AccessPolicy`]; each session looks up its [`Permissions`] from its
//! [`Peer`] when it starts, and checks every publish, request, subscription
//! and registration against them. Rules are tried in file order and the
//! first whose selector matches the peer applies; a peer no rule matches
//! gets `default` (everything, or nothing, but never a takeover: taking a
//! key from the live session that holds it needs a rule that names it).

use crate::front::peer::Peer;
use holdfast_wire::subject::{matches, validate_subscribe_subject};
use serde::Deserialize;
use std::sync::Arc;

/// What identities no rule names may do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefaultAccess {
    /// Everything (the default, so a relay without rules behaves as before).
    #[default]
    Allow,
    /// Nothing: only identities a rule names may publish, subscribe or register.
    Deny,
}

/// `[access]` as written in the configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    #[serde(default)]
    pub default: DefaultAccess,
    /// `[[access.rule]]` tables, tried in order.
    #[serde(default, rename = "rule")]
    pub rules: Vec<AccessRule>,
}

/// One `[[access.rule]]`: a selector (exactly one of `uid`, `gid`,
/// `cert_cn`) and what the selected identities may do. An omitted list
/// allows nothing of that kind.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// A Unix-socket peer's user id.
    pub uid: Option<u32>,
    /// A Unix-socket peer's primary group id.
    pub gid: Option<u32>,
    /// A QUIC peer's client-certificate subject common name.
    pub cert_cn: Option<String>,
    /// Subjects (NATS wildcards allowed) it may publish and send requests to.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Subjects (NATS wildcards allowed) it may subscribe to; a subscription
    /// is allowed when every subject it could match is allowed.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Key prefixes it may register keys under.
    #[serde(default)]
    pub register: Vec<String>,
    /// Key prefixes under which it may take over a key another live
    /// session holds (the key moves to it); elsewhere such a registration
    /// is refused as a conflict. Registering still needs `register`.
    #[serde(default)]
    pub takeover: Vec<String>,
}

/// What one kind of operation may touch.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Allowed {
    Everything,
    Only(Vec<String>),
}

/// What one identity may do; shared by its sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Which rule granted these ("access.rule[2]", or "access.default").
    pub source: String,
    publish: Allowed,
    subscribe: Allowed,
    register: Allowed,
    /// Prefixes under which keys of other sessions may be taken over.
    takeover: Vec<String>,
}

/// The operations access rules govern, as counted in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Publish,
    Request,
    Subscribe,
    Register,
}

impl Operation {
    pub const ALL: [Operation; 4] = [
        Operation::Publish,
        Operation::Request,
        Operation::Subscribe,
        Operation::Register,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Operation::Publish => "publish",
            Operation::Request => "request",
            Operation::Subscribe => "subscribe",
            Operation::Register => "register",
        }
    }
}

impl Permissions {
    fn everything(source: &str) -> Permissions {
        Permissions {
            source: source.to_string(),
            publish: Allowed::Everything,
            subscribe: Allowed::Everything,
            register: Allowed::Everything,
            takeover: Vec::new(),
        }
    }

    fn nothing(source: &str) -> Permissions {
        Permissions {
            source: source.to_string(),
            publish: Allowed::Only(Vec::new()),
            subscribe: Allowed::Only(Vec::new()),
            register: Allowed::Only(Vec::new()),
            takeover: Vec::new(),
        }
    }

    /// Whether publishing (or sending a request) to the literal `subject` is allowed.
    pub fn may_publish(&self, subject: &str) -> bool {
        match &self.publish {
            Allowed::Everything => true,
            Allowed::Only(patterns) => patterns.iter().any(|pattern| matches(pattern, subject)),
        }
    }

    /// Whether subscribing to `subject` (which may hold wildcards) is allowed.
    pub fn may_subscribe(&self, subject: &str) -> bool {
        match &self.subscribe {
            Allowed::Everything => true,
            Allowed::Only(patterns) => patterns.iter().any(|pattern| covers(pattern, subject)),
        }
    }

    /// Whether registering `key` is allowed.
    pub fn may_register(&self, key: &[u8]) -> bool {
        match &self.register {
            Allowed::Everything => true,
            Allowed::Only(prefixes) => prefixes
                .iter()
                .any(|prefix| key.starts_with(prefix.as_bytes())),
        }
    }

    /// Whether every key of etcd's range `[key, range_end)` may be
    /// registered (an empty `range_end` is `key` alone, `"\0"` every key
    /// from `key` on): the range must lie under one allowed prefix.
    pub fn may_register_range(&self, key: &[u8], range_end: &[u8]) -> bool {
        match &self.register {
            Allowed::Everything => true,
            Allowed::Only(prefixes) => prefixes.iter().any(|prefix| {
                let prefix = prefix.as_bytes();
                if !key.starts_with(prefix) {
                    return false;
                }
                match range_end {
                    [] => true,
                    [0] => false,
                    // Every key below `range_end` starts with the prefix
                    // when `range_end` is at most the first key after all
                    // of them.
                    end => prefix_end(prefix).is_some_and(|limit| end <= limit.as_slice()),
                }
            }),
        }
    }

    /// Whether `key` may be taken from another live session that holds it.
    pub fn may_take_over(&self, key: &[u8]) -> bool {
        self.takeover
            .iter()
            .any(|prefix| key.starts_with(prefix.as_bytes()))
    }
}

/// The first key after every key that starts with `prefix` (etcd's prefix
/// range end); `None` when there is none (the prefix is all 0xff bytes).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let last = prefix.iter().rposition(|byte| *byte != 0xff)?;
    let mut end = prefix[..=last].to_vec();
    end[last] += 1;
    Some(end)
}

/// Whether every subject `subject` (a subscription, wildcards allowed)
/// could match is also matched by `pattern`.
fn covers(pattern: &str, subject: &str) -> bool {
    let mut pattern_tokens = pattern.split('.');
    let mut subject_tokens = subject.split('.');
    loop {
        match (pattern_tokens.next(), subject_tokens.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(token)) if token != ">" => {}
            (Some(expected), Some(actual)) if expected == actual && actual != ">" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Which peers a rule selects.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Selector {
    Uid(u32),
    Gid(u32),
    CertCommonName(String),
}

impl Selector {
    fn selects(&self, peer: &Peer) -> bool {
        match (self, peer) {
            (Selector::Uid(wanted), Peer::Unix { uid, .. }) => wanted == uid,
            (Selector::Gid(wanted), Peer::Unix { gid, .. }) => wanted == gid,
            (
                Selector::CertCommonName(wanted),
                Peer::Quic {
                    common_name: Some(name),
                    ..
                },
            ) => wanted == name,
            _ => false,
        }
    }
}

/// The compiled `[access]` section.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    rules: Vec<(Selector, Arc<Permissions>)>,
    default: Arc<Permissions>,
}

impl AccessPolicy {
    /// Checks and compiles `[access]`; an error names the offending rule.
    pub fn compile(config: &AccessConfig) -> Result<AccessPolicy, String> {
        let mut rules = Vec::with_capacity(config.rules.len());
        for (index, rule) in config.rules.iter().enumerate() {
            let name = format!("access.rule[{index}]");
            let selector = match (rule.uid, rule.gid, &rule.cert_cn) {
                (Some(uid), None, None) => Selector::Uid(uid),
                (None, Some(gid), None) => Selector::Gid(gid),
                (None, None, Some(name)) if !name.is_empty() => {
                    Selector::CertCommonName(name.clone())
                }
                _ => {
                    return Err(format!(
                        "{name}: give exactly one of `uid`, `gid` or a non-empty `cert_cn`"
                    ))
                }
            };
            for (list, patterns) in [("publish", &rule.publish), ("subscribe", &rule.subscribe)] {
                for pattern in patterns {
                    validate_subscribe_subject(pattern)
                        .map_err(|error| format!("{name}.{list}: `{pattern}`: {error}"))?;
                }
            }
            if rule.register.iter().any(String::is_empty) {
                return Err(format!(
                    "{name}.register: an empty prefix would allow every key; leave it out and use a default of \"allow\" instead"
                ));
            }
            if rule.takeover.iter().any(String::is_empty) {
                return Err(format!(
                    "{name}.takeover: an empty prefix would let this identity take every key from the session holding it; name the prefixes"
                ));
            }
            let permissions = Permissions {
                source: name,
                publish: Allowed::Only(rule.publish.clone()),
                subscribe: Allowed::Only(rule.subscribe.clone()),
                register: Allowed::Only(rule.register.clone()),
                takeover: rule.takeover.clone(),
            };
            rules.push((selector, Arc::new(permissions)));
        }
        let default = match config.default {
            DefaultAccess::Allow => Permissions::everything("access.default"),
            DefaultAccess::Deny => Permissions::nothing("access.default"),
        };
        Ok(AccessPolicy {
            rules,
            default: Arc::new(default),
        })
    }

    /// What identities no rule selects may do: also what a connection that
    /// proves no identity (the etcd front end's TCP) gets.
    pub fn default_permissions(&self) -> Arc<Permissions> {
        self.default.clone()
    }

    /// The permissions of `peer`: the first rule selecting it, else the default.
    pub fn permissions(&self, peer: &Peer) -> Arc<Permissions> {
        self.rules
            .iter()
            .find(|(selector, _)| selector.selects(peer))
            .map_or_else(
                || self.default.clone(),
                |(_, permissions)| permissions.clone(),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(uid: u32, gid: u32) -> Peer {
        Peer::Unix {
            uid,
            gid,
            pid: Some(1),
        }
    }

    fn quic(common_name: Option<&str>) -> Peer {
        Peer::Quic {
            address: "127.0.0.1:5000".parse().unwrap(),
            common_name: common_name.map(str::to_string),
        }
    }

    fn policy(text: &str) -> Result<AccessPolicy, String> {
        let config: AccessConfig = toml::from_str(text).map_err(|error| error.to_string())?;
        AccessPolicy::compile(&config)
    }

    #[test]
    fn without_rules_everyone_may_do_everything() {
        let policy = policy("").unwrap();
        let permissions = policy.permissions(&unix(1000, 1000));
        assert!(permissions.may_publish("any.subject"));
        assert!(permissions.may_subscribe(">"));
        assert!(permissions.may_register(b"any/key"));
    }

    #[test]
    fn the_first_matching_rule_applies_and_others_get_the_default() {
        let policy = policy(
            r#"
            default = "deny"
            [[rule]]
            uid = 1000
            publish = ["prefill.>"]
            subscribe = ["results.*"]
            register = ["v1/instances/dyn/prefill/"]
            [[rule]]
            gid = 50
            publish = [">"]
            [[rule]]
            cert_cn = "decode-worker"
            publish = ["decode.*.tokens"]
            "#,
        )
        .unwrap();
        let worker = policy.permissions(&unix(1000, 50));
        assert_eq!(worker.source, "access.rule[0]");
        assert!(worker.may_publish("prefill.a.b"));
        assert!(!worker.may_publish("decode.a"));
        assert!(!worker.may_publish("prefill"));
        assert!(worker.may_register(b"v1/instances/dyn/prefill/42"));
        assert!(!worker.may_register(b"v1/instances/dyn/decode/42"));

        let group_member = policy.permissions(&unix(2000, 50));
        assert_eq!(group_member.source, "access.rule[1]");
        assert!(group_member.may_publish("anything"));
        assert!(!group_member.may_subscribe("anything"));
        assert!(!group_member.may_register(b"k"));

        let decode = policy.permissions(&quic(Some("decode-worker")));
        assert!(decode.may_publish("decode.7.tokens"));
        assert!(!decode.may_publish("decode.7.other"));

        for stranger in [
            unix(3000, 3000),
            quic(Some("other")),
            quic(None),
            Peer::Unknown,
        ] {
            let permissions = policy.permissions(&stranger);
            assert_eq!(permissions.source, "access.default");
            assert!(!permissions.may_publish("a"));
            assert!(!permissions.may_subscribe("a"));
            assert!(!permissions.may_register(b"a"));
        }
    }

    #[test]
    fn a_subscription_is_allowed_only_when_the_patterns_cover_all_it_could_match() {
        let permissions = policy(
            "default = \"deny\"\n[[rule]]\nuid = 1\nsubscribe = [\"results.*\", \"events.>\"]\n",
        )
        .unwrap()
        .permissions(&unix(1, 1));
        assert!(permissions.may_subscribe("results.a"));
        assert!(permissions.may_subscribe("results.*"));
        assert!(!permissions.may_subscribe("results.>"));
        assert!(!permissions.may_subscribe("results.a.b"));
        assert!(permissions.may_subscribe("events.a.b"));
        assert!(permissions.may_subscribe("events.>"));
        assert!(permissions.may_subscribe("events.*.x"));
        assert!(!permissions.may_subscribe("events"));
        assert!(!permissions.may_subscribe(">"));
        assert!(!permissions.may_subscribe("*"));
    }

    #[test]
    fn bad_rules_are_refused_with_their_position() {
        let error = policy("[[rule]]\npublish = [\"a\"]\n").unwrap_err();
        assert!(error.contains("access.rule[0]"), "{error}");
        let error = policy("[[rule]]\nuid = 1\ngid = 2\n").unwrap_err();
        assert!(error.contains("exactly one"), "{error}");
        let error =
            policy("[[rule]]\nuid = 1\n[[rule]]\nuid = 2\npublish = [\"a..b\"]\n").unwrap_err();
        assert!(error.contains("access.rule[1].publish"), "{error}");
        let error = policy("[[rule]]\nuid = 1\nregister = [\"\"]\n").unwrap_err();
        assert!(error.contains("access.rule[0].register"), "{error}");
        let error = policy("[[rule]]\nuid = 1\ntakeover = [\"\"]\n").unwrap_err();
        assert!(error.contains("access.rule[0].takeover"), "{error}");
        assert!(policy("[[rule]]\nuid = 1\nbogus = 1\n").is_err());
        assert!(policy("default = \"maybe\"\n").is_err());
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;

    fn permissions(text: &str, peer: &Peer) -> Arc<Permissions> {
        let config: AccessConfig = toml::from_str(text).unwrap();
        AccessPolicy::compile(&config).unwrap().permissions(peer)
    }

    const UID_7: Peer = Peer::Unix {
        uid: 7,
        gid: 7,
        pid: None,
    };

    #[test]
    fn takeover_needs_a_rule_that_names_the_prefix() {
        let allow_all = permissions("", &UID_7);
        assert!(allow_all.may_register(b"v1/instances/a"));
        assert!(
            !allow_all.may_take_over(b"v1/instances/a"),
            "the default never takes keys from their session"
        );
        let rule = permissions(
            "[[rule]]\nuid = 7\nregister = [\"v1/\"]\ntakeover = [\"v1/instances/\"]\n",
            &UID_7,
        );
        assert!(rule.may_take_over(b"v1/instances/a"));
        assert!(!rule.may_take_over(b"v1/config/a"));
    }

    #[test]
    fn a_range_is_allowed_only_inside_one_register_prefix() {
        let allowed = permissions("[[rule]]\nuid = 7\nregister = [\"v1/a/\"]\n", &UID_7);
        assert!(allowed.may_register_range(b"v1/a/k", b""));
        assert!(
            allowed.may_register_range(b"v1/a/", b"v1/a0"),
            "the prefix itself"
        );
        assert!(allowed.may_register_range(b"v1/a/x/", b"v1/a/x0"));
        assert!(allowed.may_register_range(b"v1/a/k", b"v1/a/m"));
        assert!(
            !allowed.may_register_range(b"v1/a/k", b"v1/b"),
            "runs past it"
        );
        assert!(!allowed.may_register_range(b"v1/", b"v10"), "wider than it");
        assert!(
            !allowed.may_register_range(b"v1/a/k", b"\0"),
            "every key on"
        );
        assert!(!allowed.may_register_range(b"v1/b/k", b""));
        assert!(permissions("", &UID_7).may_register_range(b"\0", b"\0"));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
    }
}
