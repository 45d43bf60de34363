//! The web console: server-rendered HTML pages (no scripts but the Connect view's noVNC),
//! forms that POST and redirect,
//! and the authentication gate every page and action passes through.
//!
//! | page | what |
//! |---|---|
//! | `/` | fleet replication dashboard |
//! | `/hosts` | hosts: add (URL, fingerprint, token), remove, reachability |
//! | `/vms` | every VM of every host, state and replication health |
//! | `/clusters` | failover clusters: quorum, nodes, where VMs run, fencing history |
//! | `/hosts/{id}/vms/{vm}` | a VM: overview, actions, replication tab, enable wizard |
//! | `/hosts/{id}/vms/{vm}/connect` | a VM's screen, keyboard and mouse (noVNC) |
//! | `/alerts` | active and past alerts, rules and channels |

/// The content security policy of every page but Connect, which adds noVNC's scripts and
/// websocket to it (a macro so that one can be `concat!`ed from it).
macro_rules! base_csp {
    () => {
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; frame-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    };
}

mod charts;
mod connect;
mod pages;
mod wizard;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::auth;
use crate::config::AuthMode;
use crate::hosts::Poller;
use crate::store::Store;

/// What every handler shares.
pub struct AppState {
    /// The console's store.
    pub store: Arc<Store>,
    /// noVNC's files (`core/`, `vendor/`).
    pub novnc_dir: std::path::PathBuf,
    /// The poller and its fleet snapshot.
    pub poller: Arc<Poller>,
    /// How users are authenticated.
    pub auth: AuthMode,
    /// Who may pass proxy headers, https, the login throttle.
    pub access: Access,
    /// Internal networks webhooks may target.
    pub webhook_allow: crate::alerts::delivery::WebhookAllow,
}

/// What the console knows of the way users reach it.
#[derive(Debug, Default)]
pub struct Access {
    /// Users reach the console over https (`public_url`): cookies are `Secure`.
    pub https: bool,
    /// Peers trusted to pass proxy headers (empty: loopback peers).
    pub trusted_proxies: Vec<IpAddr>,
    /// Failed logins per user name and client address.
    pub throttle: std::sync::Mutex<auth::Throttle>,
}

impl Access {
    /// The same settings as `config`, with an empty throttle.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            https: config.https,
            trusted_proxies: config.trusted_proxies.clone(),
            throttle: Default::default(),
        }
    }

    fn trusted(&self, peer: Option<IpAddr>) -> bool {
        crate::config::trusted_peer(&self.trusted_proxies, peer)
    }

    /// Whether the cookie must be `Secure`: the console is configured as served over
    /// https, or a trusted proxy says the request came over https.
    fn secure(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> bool {
        self.https
            || (self.trusted(peer)
                && headers
                    .get("x-forwarded-proto")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|p| p.trim().eq_ignore_ascii_case("https")))
    }

    /// The client's address: the peer, or behind a trusted proxy the last address the
    /// proxy appended to `X-Forwarded-For` (earlier ones are the client's own claims).
    fn client(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        if self.trusted(peer) {
            let forwarded = headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .last()
                .and_then(|a| a.trim().parse::<IpAddr>().ok());
            if forwarded.is_some() {
                return forwarded;
            }
        }
        peer
    }
}

/// The TCP peer of a request (set by `into_make_service_with_connect_info`); `None` if
/// unknown, which is never trusted.
fn peer_of(req: &Request) -> Option<IpAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// Shared state.
pub type Shared = Arc<AppState>;

/// The signed-in user, put in the request by the gate.
#[derive(Debug, Clone)]
pub struct User(pub String);

/// The console's router.
pub fn router(state: Shared) -> Router {
    let gated = Router::new()
        .route("/", get(pages::dashboard))
        .route("/hosts", get(pages::hosts).post(pages::add_host))
        .route("/hosts/{id}/remove", post(pages::remove_host))
        .route(
            "/hosts/{id}/create-vm",
            get(wizard::create_form).post(wizard::create_vm),
        )
        .route("/hosts/{id}/vms/{vm}/status", get(wizard::vm_status))
        .route("/status", get(wizard::fleet_status))
        .route("/hosts/{id}/vms/{vm}/confirm", get(wizard::confirm_page))
        .route("/vms", get(pages::vms))
        .route("/clusters", get(pages::clusters))
        .route("/hosts/{id}/vms/{vm}", get(pages::vm_page))
        .route("/hosts/{id}/vms/{vm}/action", post(pages::vm_action))
        .route("/hosts/{id}/vms/{vm}/connect", get(connect::connect_page))
        .route("/hosts/{id}/vms/{vm}/vnc", get(connect::vnc_proxy))
        .route("/hosts/{id}/vms/{vm}/screen.png", get(connect::screen_png))
        .route("/static/connect.js", get(connect::connect_js))
        .route("/novnc/{*path}", get(connect::novnc_file))
        .route(
            "/hosts/{id}/vms/{vm}/enable-replication",
            get(pages::enable_wizard).post(pages::enable_replication),
        )
        .route("/alerts", get(pages::alerts))
        .route("/alerts/settings", post(pages::save_alert_settings))
        .route("/alerts/test", post(pages::test_alert))
        .route("/logout", post(logout))
        .layer(axum::middleware::from_fn_with_state(state.clone(), gate));
    Router::new()
        .route("/login", get(login_page).post(login))
        .merge(gated)
        .layer(axum::middleware::from_fn(same_origin_only))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(state)
}

/// Refuses a state-changing request another site made the browser send (CSRF). In
/// password mode the `SameSite=Strict` cookie already keeps those out, but a reverse proxy
/// that authenticates by Basic auth or its own lax cookie would let them through: the
/// browser's own `Sec-Fetch-Site` and `Origin` headers say where a request came from.
/// Requests without them (scripts, curl) are not from a browser page and pass.
async fn same_origin_only(req: Request, next: Next) -> Response {
    if req.method() == axum::http::Method::GET || req.method() == axum::http::Method::HEAD {
        return next.run(req).await;
    }
    if cross_site(req.headers()) {
        return (
            StatusCode::FORBIDDEN,
            "ferry-console: refused a request sent from another site\n",
        )
            .into_response();
    }
    next.run(req).await
}

/// Whether the browser says the request comes from another site's page.
fn cross_site(h: &HeaderMap) -> bool {
    let site = h.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    match site {
        Some(site) => !matches!(site, "same-origin" | "none"),
        None => match (
            h.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
            h.get(header::HOST).and_then(|v| v.to_str().ok()),
        ) {
            (Some(origin), Some(host)) => {
                origin.split_once("://").map(|(_, rest)| rest) != Some(host)
            }
            (Some(_), None) => true,
            (None, _) => false,
        },
    }
}

const BASE_CSP: &str = base_csp!();

/// Headers on every response: the pages run no scripts and are never framed, so the
/// browser is told to refuse both (a hole in escaping then runs nothing), and error texts
/// in query strings do not travel to other sites as referrers.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    // The Connect page sets its own (wider) policy; every other response gets the base one.
    if !h.contains_key("content-security-policy") {
        h.insert(
            "content-security-policy",
            axum::http::HeaderValue::from_static(BASE_CSP),
        );
    }
    // Status fragments allow framing by the console's own pages (SAMEORIGIN); every
    // other response may not be framed at all.
    if !h.contains_key("x-frame-options") {
        h.insert(
            "x-frame-options",
            axum::http::HeaderValue::from_static("DENY"),
        );
    }
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
    ] {
        h.insert(name, axum::http::HeaderValue::from_static(value));
    }
    res
}

/// Lets a request through only with a live session (password mode) or the proxy's user
/// header (proxy mode). Pages redirect to the login form; nothing else runs.
async fn gate(State(s): State<Shared>, mut req: Request, next: Next) -> Response {
    // In header mode only the proxy may name the user: anyone else reaching the console
    // directly could set the header.
    if let AuthMode::ProxyHeader(h) = &s.auth {
        let peer = peer_of(&req);
        if !s.access.trusted(peer) {
            let who = peer.map_or("an unknown peer".to_owned(), |p| p.to_string());
            tracing::warn!(peer = %who, "refused a request from outside the trusted proxies");
            return (
                StatusCode::FORBIDDEN,
                format!("ferry-console: refused: {h} is only taken from a trusted proxy, and {who} is not one (trusted_proxies)\n"),
            )
                .into_response();
        }
    }
    let user = match &s.auth {
        AuthMode::ProxyHeader(h) => req
            .headers()
            .get(h.as_str())
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned),
        AuthMode::Password => session_user(&s, req.headers()),
    };
    match user {
        Some(u) => {
            req.extensions_mut().insert(User(u));
            next.run(req).await
        }
        None => match s.auth {
            AuthMode::ProxyHeader(_) => (
                StatusCode::UNAUTHORIZED,
                "ferry-console: no authenticated user from the reverse proxy\n",
            )
                .into_response(),
            AuthMode::Password if req.method() == axum::http::Method::GET => {
                Redirect::to("/login").into_response()
            }
            AuthMode::Password => {
                (StatusCode::UNAUTHORIZED, "ferry-console: log in first\n").into_response()
            }
        },
    }
}

fn session_user(s: &AppState, headers: &HeaderMap) -> Option<String> {
    let cookies = headers.get(header::COOKIE)?.to_str().ok()?;
    let token = auth::cookie(cookies, auth::COOKIE)?;
    s.store
        .session_user(&auth::token_hash(token), crate::now())
        .ok()
        .flatten()
}

async fn login_page(State(s): State<Shared>) -> Response {
    if let AuthMode::ProxyHeader(_) = s.auth {
        return Redirect::to("/").into_response();
    }
    login_form(None).into_response()
}

fn login_form(error: Option<&str>) -> Html<String> {
    let err = error
        .map(|e| format!(r#"<p class="error" id="error">{}</p>"#, esc(e)))
        .unwrap_or_default();
    Html(layout(
        "Log in",
        None,
        &format!(
            r#"<form method="post" action="/login" class="login">{err}
<label>User <input name="user" id="user" autocomplete="username" required></label>
<label>Password <input name="password" id="password" type="password" autocomplete="current-password" required></label>
<button type="submit" id="login">Log in</button></form>"#
        ),
    ))
}

#[derive(serde::Deserialize)]
struct LoginForm {
    user: String,
    password: String,
}

async fn login(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    axum::Form(f): axum::Form<LoginForm>,
) -> Response {
    if let AuthMode::ProxyHeader(_) = s.auth {
        return Redirect::to("/").into_response();
    }
    let peer = Some(peer.ip());
    let keys = auth::throttle_keys(&f.user, s.access.client(peer, &headers));
    // A locked name or address is refused before the password is looked at, whatever it
    // is, so the answer says nothing about the password or whether the user exists.
    let refused = || {
        let locked = s
            .access
            .throttle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check(&keys, crate::now());
        locked.err().map(|left| {
            tracing::warn!(user = ?f.user, keys = ?keys, "login refused: too many failures");
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, left.to_string())],
                login_form(Some(&format!(
                    "too many failed logins for this user or from this address: try again in {} min",
                    (left + 59) / 60
                ))),
            )
                .into_response()
        })
    };
    if let Some(r) = refused() {
        return r;
    }
    // A missing user is checked against a dummy hash so both paths cost the same; argon2
    // is CPU-bound by design, so it runs off the async workers.
    let phc = s.store.user_phc(&f.user).ok().flatten();
    let password = f.password.clone();
    // Each check takes 19 MiB and a CPU for a moment: a flood of logins waits its turn
    // instead of exhausting memory.
    static CHECKS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
    let _turn = CHECKS.acquire().await;
    // Again with the turn: a burst of parallel guesses all passed the first look while
    // the earlier ones were still being checked.
    if let Some(r) = refused() {
        return r;
    }
    let ok = tokio::task::spawn_blocking(move || match &phc {
        Some(phc) => auth::verify_password(&password, phc),
        None => {
            auth::verify_password(&password, dummy_phc());
            false
        }
    })
    .await
    .unwrap_or(false);
    if !ok {
        tracing::warn!(user = ?f.user, keys = ?keys, "failed login");
        s.access
            .throttle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fail(&keys, crate::now());
        return (
            StatusCode::UNAUTHORIZED,
            login_form(Some("wrong user or password")),
        )
            .into_response();
    }
    s.access
        .throttle
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .succeed(&f.user);
    let token = auth::new_token();
    let now = crate::now();
    if let Err(e) = s.store.add_session(
        &auth::token_hash(&token),
        &f.user,
        now + auth::SESSION_TTL_S,
    ) {
        return error_page(&format!("cannot start a session: {e}"));
    }
    let cookie = auth::session_cookie(&token, s.access.secure(peer, &headers));
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

/// An argon2id hash of a random string, verified against when the user does not exist.
fn dummy_phc() -> &'static str {
    static PHC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PHC.get_or_init(|| auth::hash_password(&auth::new_token()))
}

async fn logout(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Some(token) = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| auth::cookie(c, auth::COOKIE))
    {
        let _ = s.store.delete_session(&auth::token_hash(token));
    }
    let clear = auth::clear_cookie(s.access.secure(Some(peer.ip()), &headers));
    ([(header::SET_COOKIE, clear)], Redirect::to("/login")).into_response()
}

/// A page that reports an internal failure.
pub fn error_page(message: &str) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Html(layout(
            "Error",
            None,
            &format!(r#"<p class="error" id="error">{}</p>"#, esc(message)),
        )),
    )
        .into_response()
}

/// HTML-escapes text for element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Percent-encodes a path segment or query value.
pub use ferry_client::percent_encode as url_enc;

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a UNIX time.
pub fn fmt_time(t: i64) -> String {
    ferry_domain::CivilTime::from_unix(t).to_string()
}

/// `HH:MM:SS` (UTC) of a UNIX time.
pub fn fmt_clock(t: i64) -> String {
    fmt_time(t)[11..].to_owned()
}

/// A duration in seconds, for people.
pub fn fmt_secs(s: i64) -> String {
    match s {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

/// Bytes, for people (binary units).
pub fn fmt_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

const CSS: &str = r#"
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#f4f5f7;font-size:14px}
header{background:#1f3a5f;color:#fff;padding:8px 16px;display:flex;gap:18px;align-items:center}
header a{color:#fff;text-decoration:none}header .brand{font-weight:bold;font-size:16px}
header form{margin-left:auto}main{padding:16px}
table{border-collapse:collapse;background:#fff;margin:8px 0 16px}
th,td{border:1px solid #d5d8de;padding:4px 8px;text-align:left;vertical-align:top}th{background:#e9ecf1}
.health{display:inline-block;padding:1px 8px;border-radius:9px;color:#fff;font-weight:bold}
.normal{background:#2e7d32}.warning{background:#e6a100}.critical{background:#c62828}.unknown{background:#777}
.error{color:#b00020;font-weight:bold}.ok{color:#1b5e20;font-weight:bold}
fieldset{background:#fff;border:1px solid #d5d8de;margin:8px 0;padding:8px}
label{display:block;margin:4px 0}.inline{display:inline-block;margin:2px}
.charts svg{margin:4px}.tabs a{margin-right:12px}.login{max-width:320px;background:#fff;padding:16px}
button{cursor:pointer}
#hosts td:nth-child(3){max-width:300px;word-break:break-all;font-size:12px}
#screen{height:75vh;min-height:420px}img.thumb{width:160px;border:1px solid #d5d8de;background:#000}
"#;

/// A page that reloads itself every `secs` seconds (pages without forms: nothing typed is
/// lost; no script needed).
pub fn refreshing(html: String, secs: u32) -> String {
    html.replacen(
        r#"<meta charset="utf-8">"#,
        &format!(r#"<meta charset="utf-8"><meta http-equiv="refresh" content="{secs}">"#),
        1,
    )
}

/// The page frame: navigation (when signed in) and the body.
pub fn layout(title: &str, user: Option<&str>, body: &str) -> String {
    let nav = match user {
        Some(u) => format!(
            r#"<a href="/">Dashboard</a><a href="/hosts">Hosts</a><a href="/vms">VMs</a><a href="/clusters">Clusters</a><a href="/alerts">Alerts</a><form method="post" action="/logout"><span>{}</span> <button type="submit" id="logout">Log out</button></form>"#,
            esc(u)
        ),
        None => String::new(),
    };
    format!(
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{t} · Ferry console</title><style>{CSS}</style></head><body><header><span class="brand">Ferry console</span>{nav}</header><main><h1>{t}</h1>{body}</main></body></html>"#,
        t = esc(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting() {
        assert_eq!(fmt_time(0), "1970-01-01 00:00:00");
        assert_eq!(fmt_time(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(
            esc("<a href=\"x\">'&"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;"
        );
        assert_eq!(url_enc("a b/c"), "a%20b%2Fc");
        assert_eq!(fmt_secs(30), "30 s");
    }

    #[test]
    fn https_and_client_address_come_from_config_or_trusted_proxies() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        h.append("x-forwarded-for", "1.1.1.1, 2.2.2.2".parse().unwrap());
        h.append("x-forwarded-for", "3.3.3.3".parse().unwrap());
        let none = HeaderMap::new();
        // public_url = "https://…": Secure whoever asks.
        let a = Access {
            https: true,
            ..Access::default()
        };
        assert!(a.secure(ip("10.9.9.9"), &none));
        // Otherwise only a trusted proxy's word counts.
        let a = Access {
            trusted_proxies: vec!["10.0.0.5".parse().unwrap()],
            ..Access::default()
        };
        assert!(a.secure(ip("10.0.0.5"), &h));
        assert!(!a.secure(ip("10.0.0.6"), &h));
        assert!(!a.secure(ip("10.0.0.5"), &none));
        // The client is the address the proxy appended last; others' claims are ignored.
        assert_eq!(a.client(ip("10.0.0.5"), &h), ip("3.3.3.3"));
        assert_eq!(a.client(ip("10.0.0.6"), &h), ip("10.0.0.6"));
        assert_eq!(a.client(ip("10.0.0.5"), &none), ip("10.0.0.5"));
    }
}
