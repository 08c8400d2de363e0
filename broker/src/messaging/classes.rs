//! Message classes: their settings, their order, and which class a publish
//! belongs to.
//!
//! Four classes always exist (`prefill`, `decode`, `kv_events`, `default`,
//! highest priority first); `[classes.NAME]` tables override their settings
//! or add classes. A publish that names a class gets it; one that names none
//! gets the first class (in priority order) with a matching subject pattern,
//! else `default`.

use crate::util::duration;
use holdfast_wire::subject;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// The class every unclassified publish falls into.
pub const DEFAULT_CLASS: &str = "default";

/// Where a class's undelivered messages live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Journaled in redb; acked `Journaled` once the commit is durable.
    Durable,
    /// Held in memory up to `memory_bytes` (acked `Queued`), journaled beyond.
    Spill,
}

/// What a full class does with a new publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Refuse it with JournalFull; nothing accepted is ever dropped.
    Reject,
    /// Drop the oldest undelivered messages of the class (counted, logged).
    DropOldest,
}

/// `[classes.NAME]`: one class's settings. Missing keys take the defaults of
/// the built-in class of that name, or of `default` for a new class.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassOverrides {
    pub priority: Option<u32>,
    pub subjects: Option<Vec<String>>,
    pub durability: Option<Durability>,
    pub memory_bytes: Option<u64>,
    #[serde(default, deserialize_with = "duration::deserialize_option")]
    pub retention: Option<Duration>,
    #[serde(default, deserialize_with = "duration::deserialize_option")]
    pub max_age: Option<Duration>,
    pub max_bytes: Option<u64>,
    pub when_full: Option<WhenFull>,
    pub jetstream: Option<bool>,
}

/// A class, fully resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassSpec {
    pub name: String,
    /// Lower drains first.
    pub priority: u32,
    pub subjects: Vec<String>,
    pub durability: Durability,
    pub memory_bytes: u64,
    /// Undelivered messages are kept at least this long.
    pub retention: Duration,
    /// Undelivered messages older than this may expire (counted).
    pub max_age: Duration,
    /// Disk budget of the class's journal.
    pub max_bytes: u64,
    pub when_full: WhenFull,
    /// The class's subjects are captured by JetStream streams: a message
    /// counts as delivered on its PubAck instead of a core round trip.
    pub jetstream: bool,
}

const MIB: u64 = 1024 * 1024;
/// Where the Dynamo runtime publishes KV cache events
/// (`namespace.<ns>.component.<component>.endpoint.<endpoint>.kv-events`):
/// classified `kv_events` (durable) out of the box, so the drop-in NATS front
/// end journals them without configuration.
const DYNAMO_KV_EVENTS: &str = "namespace.*.component.*.endpoint.*.kv-events";
const FIFTEEN_MINUTES: Duration = Duration::from_secs(15 * 60);
/// Default `max_age` beyond `retention`: NATS returning just as the
/// retention runs out is noticed within a second or two, and an outage as
/// long as the retention must lose nothing.
const EXPIRY_MARGIN: Duration = Duration::from_secs(60);

fn builtin(name: &str, priority: u32, durability: Durability) -> ClassSpec {
    ClassSpec {
        name: name.to_string(),
        priority,
        subjects: Vec::new(),
        durability,
        memory_bytes: 64 * MIB,
        retention: FIFTEEN_MINUTES,
        max_age: FIFTEEN_MINUTES + EXPIRY_MARGIN,
        max_bytes: 1024 * MIB,
        when_full: WhenFull::Reject,
        jetstream: false,
    }
}

fn builtins() -> Vec<ClassSpec> {
    vec![
        builtin("prefill", 0, Durability::Spill),
        builtin("decode", 1, Durability::Spill),
        ClassSpec {
            subjects: vec![DYNAMO_KV_EVENTS.to_string()],
            ..builtin("kv_events", 2, Durability::Durable)
        },
        builtin(DEFAULT_CLASS, 3, Durability::Spill),
    ]
}

/// The resolved classes, in drain order (priority, then name).
#[derive(Debug, Clone)]
pub struct Classes {
    specs: Vec<ClassSpec>,
    default_index: usize,
}

/// Index of a class in [`Classes`] (drain order).
pub type ClassId = usize;

impl Classes {
    /// Resolves overrides over the built-ins; errors name the class and key.
    pub fn resolve(overrides: &BTreeMap<String, ClassOverrides>) -> Result<Classes, String> {
        let mut specs = builtins();
        for (name, given) in overrides {
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '.') {
                return Err(format!(
                    "classes.{name}: a class name is one word without dots"
                ));
            }
            let index = match specs.iter().position(|spec| spec.name == *name) {
                Some(index) => index,
                None => {
                    let mut spec = builtin(name, 100, Durability::Spill);
                    spec.priority = specs.iter().map(|spec| spec.priority).max().unwrap_or(0) + 1;
                    specs.push(spec);
                    specs.len() - 1
                }
            };
            let spec = &mut specs[index];
            if let Some(priority) = given.priority {
                spec.priority = priority;
            }
            if let Some(subjects) = &given.subjects {
                for pattern in subjects {
                    subject::validate_subscribe_subject(pattern).map_err(|error| {
                        format!("classes.{name}.subjects: {pattern:?}: {error}")
                    })?;
                }
                spec.subjects = subjects.clone();
            }
            if let Some(durability) = given.durability {
                spec.durability = durability;
            }
            if let Some(bytes) = given.memory_bytes {
                spec.memory_bytes = bytes;
            }
            if let Some(retention) = given.retention {
                spec.retention = retention;
                spec.max_age = retention + EXPIRY_MARGIN;
            }
            if let Some(max_age) = given.max_age {
                spec.max_age = max_age;
            }
            if let Some(bytes) = given.max_bytes {
                spec.max_bytes = bytes;
            }
            if let Some(when_full) = given.when_full {
                spec.when_full = when_full;
            }
            if let Some(jetstream) = given.jetstream {
                spec.jetstream = jetstream;
            }
            if spec.max_age < spec.retention {
                return Err(format!(
                    "classes.{name}.max_age: must be at least the retention ({}s)",
                    spec.retention.as_secs()
                ));
            }
            if spec.max_bytes == 0 {
                return Err(format!("classes.{name}.max_bytes: must be greater than 0"));
            }
        }
        specs.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
        let default_index = specs
            .iter()
            .position(|spec| spec.name == DEFAULT_CLASS)
            .unwrap_or(specs.len() - 1);
        Ok(Classes {
            specs,
            default_index,
        })
    }

    pub fn specs(&self) -> &[ClassSpec] {
        &self.specs
    }

    pub fn get(&self, class: ClassId) -> Option<&ClassSpec> {
        self.specs.get(class)
    }

    pub fn len(&self) -> usize {
        self.specs.len()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.specs.iter().map(|spec| spec.name.as_str())
    }

    pub fn by_name(&self, name: &str) -> Option<ClassId> {
        self.specs.iter().position(|spec| spec.name == name)
    }

    /// The class of a publish: the one it names, else the first matching
    /// subject pattern in drain order, else `default`. `Err` names the
    /// unknown class.
    pub fn classify(&self, named: Option<&str>, subject_name: &str) -> Result<ClassId, String> {
        if let Some(name) = named {
            return self.by_name(name).ok_or_else(|| name.to_string());
        }
        Ok(self
            .specs
            .iter()
            .position(|spec| {
                spec.subjects
                    .iter()
                    .any(|pattern| subject::matches(pattern, subject_name))
            })
            .unwrap_or(self.default_index))
    }

    /// The class counted for a publish that was refused before it had one.
    pub fn default_class(&self) -> ClassId {
        self.default_index
    }
}

impl Default for Classes {
    fn default() -> Classes {
        // The built-ins alone always resolve.
        Classes::resolve(&BTreeMap::new()).unwrap_or_else(|_| Classes {
            specs: builtins(),
            default_index: 3,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overrides(toml_text: &str) -> BTreeMap<String, ClassOverrides> {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn builtins_drain_prefill_first_and_kv_events_is_durable() {
        let classes = Classes::default();
        let names: Vec<&str> = classes.names().collect();
        assert_eq!(names, ["prefill", "decode", "kv_events", "default"]);
        let kv = classes.get(classes.by_name("kv_events").unwrap()).unwrap();
        assert_eq!(kv.durability, Durability::Durable);
        assert_eq!(kv.retention, FIFTEEN_MINUTES);
        assert_eq!(kv.max_age, kv.retention + EXPIRY_MARGIN);
        let dynamo_event = "namespace.dynamo.component.backend.endpoint.generate.kv-events";
        assert_eq!(
            classes.classify(None, dynamo_event),
            Ok(classes.by_name("kv_events").unwrap())
        );
    }

    #[test]
    fn publishes_are_classified_by_name_then_subject_then_default() {
        let classes = Classes::resolve(&overrides(
            "[prefill]\nsubjects = [\"work.prefill.>\"]\n[decode]\nsubjects = [\"work.*.decode\", \"work.>\"]\n",
        ))
        .unwrap();
        let id = |name: &str| classes.by_name(name).unwrap();
        assert_eq!(
            classes.classify(Some("kv_events"), "work.prefill.x"),
            Ok(id("kv_events"))
        );
        assert_eq!(classes.classify(None, "work.prefill.x"), Ok(id("prefill")));
        assert_eq!(classes.classify(None, "work.a.decode"), Ok(id("decode")));
        assert_eq!(classes.classify(None, "work.other"), Ok(id("decode")));
        assert_eq!(classes.classify(None, "elsewhere"), Ok(id("default")));
        assert_eq!(classes.classify(Some("nope"), "x"), Err("nope".to_string()));
    }

    #[test]
    fn new_classes_and_overrides_resolve_with_errors_naming_the_key() {
        let classes = Classes::resolve(&overrides(
            "[bulk]\npriority = 10\nretention = \"1m\"\n[prefill]\nmax_bytes = 1000\nwhen_full = \"drop_oldest\"\n",
        ))
        .unwrap();
        let bulk = classes.get(classes.by_name("bulk").unwrap()).unwrap();
        assert_eq!(bulk.retention, Duration::from_secs(60));
        assert_eq!(bulk.max_age, Duration::from_secs(60) + EXPIRY_MARGIN);
        assert_eq!(classes.names().last(), Some("bulk"));
        let prefill = classes.get(classes.by_name("prefill").unwrap()).unwrap();
        assert_eq!(prefill.when_full, WhenFull::DropOldest);

        let error = Classes::resolve(&overrides(
            "[decode]\nretention = \"10m\"\nmax_age = \"1m\"\n",
        ))
        .unwrap_err();
        assert!(error.contains("classes.decode.max_age"), "{error}");
        let error = Classes::resolve(&overrides("[decode]\nsubjects = [\"a..b\"]\n")).unwrap_err();
        assert!(error.contains("classes.decode.subjects"), "{error}");
    }
}
