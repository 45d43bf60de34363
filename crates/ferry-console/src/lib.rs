//! The Ferry console: one web console and replication monitor for many ferryd hosts. It
//! talks to each host over its TLS API (pinned certificate, bearer token) with
//! `ferry-client`, keeps its own history and alerts in an embedded store, and sends
//! e-mail and webhook alerts. Runs anywhere — a third site is best, so it can alert when a
//! whole site is gone.
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | the config file |
//! | [`store`] | the console's SQLite store |
//! | [`auth`] | password hashing (argon2id), sessions |
//! | [`hosts`] | managed hosts and the poller (fleet snapshot, history) |
//! | [`alerts`] | the pure rules engine, delivery by SMTP and webhook |
//! | [`web`] | pages, actions, charts, the authentication gate |

pub mod alerts;
pub mod auth;
pub mod config;
pub mod hosts;
pub mod store;
pub mod web;

/// Now, UNIX seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
