//! Who may use the console: passwords hashed with argon2id (PHC strings in the store),
//! random session tokens (only their SHA-256 is stored, so a copy of the store does not
//! hand out live sessions), and the session cookie.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use ring::rand::SecureRandom;

/// The session cookie's name.
pub const COOKIE: &str = "ferry_session";
/// How long a session lasts (seconds).
pub const SESSION_TTL_S: i64 = 12 * 3600;

/// The argon2id PHC string of `password` (random salt, the crate's default cost:
/// 19 MiB, 2 passes — OWASP's recommended minimum).
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters")
        .to_string()
}

/// Whether `password` matches the PHC string (constant-time inside argon2).
pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A new random session token (256 bits, hex).
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("system randomness");
    hex(&b)
}

/// What the store keeps of a token.
pub fn token_hash(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The `Set-Cookie` value of a new session: `HttpOnly` and `SameSite=Strict` always,
/// `Secure` when users reach the console over https (a browser refuses a `Secure`
/// cookie sent over plain http, so it is set only then).
pub fn session_cookie(token: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_TTL_S}{}",
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that ends the session cookie (same attributes, so the browser
/// replaces the one it has).
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

/// Failed logins that lock a user name or an address…
pub const MAX_FAILURES: usize = 5;
/// …within this window (seconds)…
pub const FAILURE_WINDOW_S: i64 = 15 * 60;
/// …for this long (seconds).
pub const LOCKOUT_S: i64 = 15 * 60;
/// Keys tracked at most: a flood of made-up names or addresses cannot grow memory
/// without bound (the oldest entries go first).
const MAX_KEYS: usize = 100_000;

/// Login throttle, per user name and per client address: after [`MAX_FAILURES`] failed
/// logins within [`FAILURE_WINDOW_S`], further attempts for that name or from that
/// address are refused for [`LOCKOUT_S`] without checking the password. In memory: a
/// restart (an administrator's act) clears it. Pure: the caller passes the clock.
#[derive(Debug, Default)]
pub struct Throttle {
    keys: std::collections::HashMap<String, Track>,
}

#[derive(Debug, Default)]
struct Track {
    /// Times of recent failures (at most [`MAX_FAILURES`]).
    failures: std::collections::VecDeque<i64>,
    /// Locked until (UNIX s); 0: not locked.
    locked_until: i64,
    /// Last change, to evict the stalest key first.
    touched: i64,
}

/// The keys of one attempt: `user:NAME` and `addr:IP`.
pub fn throttle_keys(user: &str, addr: Option<std::net::IpAddr>) -> Vec<String> {
    let mut k = vec![format!("user:{user}")];
    if let Some(a) = addr {
        k.push(format!("addr:{}", a.to_canonical()));
    }
    k
}

impl Throttle {
    /// `Err(seconds left)` if any key is locked at `now`.
    pub fn check(&self, keys: &[String], now: i64) -> Result<(), i64> {
        let left = keys
            .iter()
            .filter_map(|k| self.keys.get(k))
            .map(|t| t.locked_until - now)
            .max()
            .unwrap_or(0);
        if left > 0 {
            Err(left)
        } else {
            Ok(())
        }
    }

    /// Records a failed attempt for every key; a key that reaches [`MAX_FAILURES`] within
    /// the window is locked.
    pub fn fail(&mut self, keys: &[String], now: i64) {
        if self.keys.len() + keys.len() > MAX_KEYS {
            self.keys.retain(|_, t| {
                t.locked_until > now
                    || t.failures
                        .back()
                        .is_some_and(|&f| f > now - FAILURE_WINDOW_S)
            });
            while self.keys.len() + keys.len() > MAX_KEYS {
                let Some(oldest) = self
                    .keys
                    .iter()
                    .min_by_key(|(_, t)| t.touched)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                self.keys.remove(&oldest);
            }
        }
        for k in keys {
            let t = self.keys.entry(k.clone()).or_default();
            t.touched = now;
            while t
                .failures
                .front()
                .is_some_and(|&f| f <= now - FAILURE_WINDOW_S)
            {
                t.failures.pop_front();
            }
            t.failures.push_back(now);
            if t.failures.len() >= MAX_FAILURES {
                t.failures.clear();
                t.locked_until = now + LOCKOUT_S;
            }
        }
    }

    /// A successful login clears its user name's failures (not its address's: one good
    /// account must not reset the count of guesses against others from that address).
    pub fn succeed(&mut self, user: &str) {
        self.keys.remove(&format!("user:{user}"));
    }
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_with_argon2id_and_verify() {
        let phc = hash_password("s3cret");
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        assert!(verify_password("s3cret", &phc));
        assert!(!verify_password("S3cret", &phc));
        assert!(!verify_password("s3cret", "garbage"));
        // Salted: the same password hashes differently.
        assert_ne!(phc, hash_password("s3cret"));
    }

    #[test]
    fn tokens_and_cookies() {
        let t = new_token();
        assert_eq!(t.len(), 64);
        assert_ne!(t, new_token());
        assert_eq!(token_hash(&t).len(), 64);
        assert_eq!(cookie("a=1; ferry_session=xyz", COOKIE), Some("xyz"));
        assert_eq!(cookie("a=1", COOKIE), None);
        let c = session_cookie("abc", false);
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict"),
            "{c}"
        );
        assert!(!c.contains("Secure"), "{c}");
        assert!(session_cookie("abc", true).ends_with("; Secure"));
        assert!(clear_cookie(true).contains("Max-Age=0"));
    }

    #[test]
    fn throttle_locks_a_user_or_an_address_after_five_failures_in_the_window() {
        let mut t = Throttle::default();
        let ip = |s: &str| Some(s.parse().unwrap());
        let now = 1_000_000;
        // Four failures spread wider than the window never lock.
        for i in 0..8 {
            let k = throttle_keys("alice", ip("10.0.0.1"));
            t.fail(&k, now + i * (FAILURE_WINDOW_S / 3));
            assert!(t.check(&k, now + i * (FAILURE_WINDOW_S / 3)).is_ok(), "{i}");
        }
        // Five within the window lock the name, from any address…
        let now = now + 10 * FAILURE_WINDOW_S;
        for i in 0..5 {
            t.fail(&throttle_keys("bob", ip(&format!("10.0.1.{i}"))), now + i);
        }
        assert_eq!(
            t.check(&throttle_keys("bob", ip("10.9.9.9")), now + 5),
            Err(LOCKOUT_S - 1)
        );
        // …but not the addresses (one failure each), nor another user.
        assert!(t
            .check(&throttle_keys("carol", ip("10.0.1.0")), now + 5)
            .is_ok());
        // Five from one address lock the address for every name.
        for i in 0..5 {
            t.fail(&throttle_keys(&format!("u{i}"), ip("10.0.2.1")), now + i);
        }
        assert!(t
            .check(&throttle_keys("carol", ip("10.0.2.1")), now + 5)
            .is_err());
        assert!(t
            .check(&throttle_keys("carol", ip("::ffff:10.0.2.1")), now + 5)
            .is_err());
        // The lock ends after the back-off.
        assert!(t
            .check(&throttle_keys("bob", ip("10.9.9.9")), now + 4 + LOCKOUT_S)
            .is_ok());
        assert!(t
            .check(&throttle_keys("carol", ip("10.0.2.1")), now + 4 + LOCKOUT_S)
            .is_ok());
        // A success clears the name's count.
        let k = throttle_keys("dave", ip("10.0.3.1"));
        for i in 0..4 {
            t.fail(&k, now + i);
        }
        t.succeed("dave");
        t.fail(&throttle_keys("dave", ip("10.0.3.2")), now + 5);
        assert!(t
            .check(&throttle_keys("dave", ip("10.0.3.3")), now + 6)
            .is_ok());
    }

    #[test]
    fn throttle_memory_is_bounded() {
        let mut t = Throttle::default();
        for i in 0..(MAX_KEYS as i64 + 10) {
            t.fail(&[format!("user:{i}")], 1_000 + i);
        }
        assert!(t.keys.len() <= MAX_KEYS);
    }
}
