//! NATS auth material for integration tests, made in-process.
//!
//! [`NatsAuthFixture::generate`] mints a fresh operator, account (plus a
//! system account) and user, signs their JWTs by hand (nkeys ed25519 over
//! `header.claims`, base64url without padding, as nats-io/jwt v2 does), and
//! renders the user's `.creds` file and the nats-server operator-mode
//! config with an in-memory resolver, so no `nsc` or `nats` CLI is needed.
//! [`nkey_user`] and [`nkey_config`] cover plain nkey (non-JWT) auth.

#![allow(dead_code)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use nkeys::KeyPair;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Decentralized-auth material: one operator, one application account, a
/// system account and one user of the application account.
pub struct NatsAuthFixture {
    pub operator_jwt: String,
    pub account_public_key: String,
    pub account_jwt: String,
    pub system_account_public_key: String,
    pub system_account_jwt: String,
    /// Lets a test mint more users of the account: see [`Self::new_user`].
    pub account_seed: String,
    pub user_public_key: String,
    pub user_jwt: String,
    /// The whole `.creds` file, for `ConnectOptions::with_credentials`.
    pub user_creds: String,
    pub user_seed: String,
}

impl NatsAuthFixture {
    /// A fresh key hierarchy with user `user_name`. `expires_at_unix` sets
    /// the user JWT's `exp`; a time in the past makes a user the server
    /// refuses.
    pub fn generate(user_name: &str, expires_at_unix: Option<u64>) -> NatsAuthFixture {
        let operator = KeyPair::new_operator();
        let account = KeyPair::new_account();
        let system_account = KeyPair::new_account();

        let operator_jwt = sign_jwt(
            &operator,
            &operator.public_key(),
            "test-operator",
            None,
            json!({
                "type": "operator",
                "version": 2,
                "system_account": system_account.public_key(),
            }),
        );
        let account_jwt = sign_jwt(
            &operator,
            &account.public_key(),
            "test-account",
            None,
            account_nats(),
        );
        let system_account_jwt = sign_jwt(
            &operator,
            &system_account.public_key(),
            "SYS",
            None,
            account_nats(),
        );
        let account_seed = account.seed().expect("a generated account key has a seed");
        let (user_jwt, user_seed, user_public_key) =
            mint_user(&account, user_name, expires_at_unix);
        NatsAuthFixture {
            operator_jwt,
            account_public_key: account.public_key(),
            account_jwt,
            system_account_public_key: system_account.public_key(),
            system_account_jwt,
            account_seed,
            user_public_key,
            user_creds: creds_file(&user_jwt, &user_seed),
            user_jwt,
            user_seed,
        }
    }

    /// Another user of the same account: `(.creds text, seed)`, so one
    /// server can face, say, a valid and an expired user.
    pub fn new_user(&self, user_name: &str, expires_at_unix: Option<u64>) -> (String, String) {
        let account = KeyPair::from_seed(&self.account_seed).expect("fixture's account seed");
        let (jwt, seed, _) = mint_user(&account, user_name, expires_at_unix);
        (creds_file(&jwt, &seed), seed)
    }

    /// nats-server config lines for operator mode with the in-memory
    /// resolver; add a `listen` line and start with `nats-server -c`.
    ///
    /// The system account is optional in 2.15 (only a warning without it),
    /// but once named, by this line or the operator's claim, it must be
    /// preloaded too or the server refuses to start.
    pub fn server_config(&self) -> String {
        format!(
            "operator: {operator}\n\
             system_account: {sys}\n\
             resolver: MEMORY\n\
             resolver_preload: {{\n  {acc}: {acc_jwt}\n  {sys}: {sys_jwt}\n}}\n",
            operator = self.operator_jwt,
            sys = self.system_account_public_key,
            acc = self.account_public_key,
            acc_jwt = self.account_jwt,
            sys_jwt = self.system_account_jwt,
        )
    }
}

/// A fresh user nkey: `(seed "SU...", public key "U...")`. Put the public
/// key in [`nkey_config`] and connect with
/// `async_nats::ConnectOptions::with_nkey(seed)`.
pub fn nkey_user() -> (String, String) {
    let user = KeyPair::new_user();
    let seed = user.seed().expect("a generated user key has a seed");
    (seed, user.public_key())
}

/// nats-server config lines admitting exactly the given nkey users.
pub fn nkey_config(public_keys: &[&str]) -> String {
    let users: Vec<String> = public_keys
        .iter()
        .map(|key| format!("{{ nkey: {key} }}"))
        .collect();
    format!("authorization {{ users = [ {} ] }}\n", users.join(", "))
}

/// `(jwt, seed, public key)` of a fresh user signed by `account`.
fn mint_user(
    account: &KeyPair,
    name: &str,
    expires_at_unix: Option<u64>,
) -> (String, String, String) {
    let user = KeyPair::new_user();
    // Absent limits decode as 0, which nats-server enforces: no
    // subscriptions and a 0-byte payload cap.
    let nats = json!({
        "type": "user",
        "version": 2,
        "pub": {},
        "sub": {},
        "subs": -1,
        "data": -1,
        "payload": -1,
    });
    let jwt = sign_jwt(account, &user.public_key(), name, expires_at_unix, nats);
    let seed = user.seed().expect("a generated user key has a seed");
    (jwt, seed, user.public_key())
}

/// Unlimited: absent limits decode as 0, which nats-server enforces, so an
/// account without them refuses every connection ("maximum account active
/// connections exceeded").
fn account_nats() -> Value {
    json!({
        "type": "account",
        "version": 2,
        "limits": {
            "subs": -1, "data": -1, "payload": -1, "imports": -1,
            "exports": -1, "wildcards": true, "conn": -1, "leaf": -1,
        },
        "default_permissions": { "pub": {}, "sub": {} },
    })
}

fn sign_jwt(
    issuer: &KeyPair,
    subject: &str,
    name: &str,
    expires_at_unix: Option<u64>,
    nats: Value,
) -> String {
    let mut claims = json!({
        "jti": unique_id(),
        "iat": now_unix(),
        "iss": issuer.public_key(),
        "sub": subject,
        "name": name,
        "nats": nats,
    });
    if let Some(exp) = expires_at_unix {
        claims["exp"] = json!(exp);
    }
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{body}");
    let signature = issuer
        .sign(signing_input.as_bytes())
        .expect("a generated key pair can sign");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// nats-server 2.15 accepts any `jti`, or none: unlike nats-io/jwt it does
/// not want the base32 SHA-256 of the claims, so no hashing crate is needed.
fn unique_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "jti-{}-{}",
        now_unix(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn creds_file(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}
