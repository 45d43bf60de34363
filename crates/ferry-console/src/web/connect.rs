//! "Connect" (Hyper-V's VMConnect): a VM's screen in the page through noVNC, and screen
//! thumbnails for the VM list.
//!
//! The browser never reaches a host: its websocket ends at this console, which checks the
//! session and that the page asking is this console's own (a websocket is not bound by
//! CORS, so another site could otherwise open one with the user's cookie), then opens the
//! same upgrade to the VM's host over TLS with the host's pinned certificate and token and
//! relays the bytes both ways. The websocket handshake itself (key, accept, subprotocol)
//! passes through unchanged between the browser and ferryd, which speaks the websocket
//! framing and bridges it to QEMU's VNC unix socket.

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use ferry_api_types::VmInfo;
use hyper_util::rt::TokioIo;

use super::pages::{api_vm, back, host_row, page, vm_url};
use super::{cross_site, esc, Shared, User};
use crate::hosts::{client, error_chain};

/// The Connect page's policy: the base one, plus scripts from this console (noVNC's
/// modules and the page's own) and a websocket back to it. Nothing inline, nothing from
/// elsewhere.
const CONNECT_CSP: &str = concat!(base_csp!(), "; script-src 'self'; connect-src 'self'");

/// The page's own script (noVNC does the rest).
const CONNECT_JS: &str = include_str!("connect.js");

/// `GET /hosts/{id}/vms/{vm}/connect`: the screen, keyboard and mouse of a running VM.
pub async fn connect_page(
    State(s): State<Shared>,
    Extension(user): Extension<User>,
    Path((id, vm)): Path<(i64, String)>,
) -> Response {
    let row = match host_row(&s, id) {
        Ok(r) => r,
        Err(e) => return back("/vms", Err(e)),
    };
    let url = vm_url(id, &vm);
    let info: VmInfo = match client(&row).get(&api_vm(&vm, "")).await {
        Ok(i) => i,
        Err(e) => {
            return back(
                &url,
                Err(format!("{vm} on {}: {}", row.name, error_chain(&e))),
            )
        }
    };
    if !info.vnc {
        return back(
            &url,
            Err(format!(
                "VM {vm} has no display (it was created with --no-vnc)"
            )),
        );
    }
    if !info.state.has_process() {
        return back(
            &url,
            Err(format!("VM {vm} is {}: start it to connect", info.state)),
        );
    }
    let body = format!(
        r#"<p>Host <b>{host}</b> · state <b id="vm-state">{state}</b> · <span id="vnc-status">connecting…</span> <button type="button" id="send-cad">Ctrl+Alt+Del</button> <a href="{url}" id="back-to-vm">Back to the VM</a></p><div id="screen" data-ws="{ws}"></div><script type="module" src="/static/connect.js"></script>"#,
        host = esc(&row.name),
        state = esc(&info.state.to_string()),
        url = esc(&url),
        ws = esc(&format!("{url}/vnc")),
    );
    let mut res = page(&format!("Connect to {vm}"), &user, body).into_response();
    res.headers_mut().insert(
        "content-security-policy",
        HeaderValue::from_static(CONNECT_CSP),
    );
    res
}

/// `GET /static/connect.js`.
pub async fn connect_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        CONNECT_JS,
    )
        .into_response()
}

/// `GET /novnc/{*path}`: noVNC's ES modules from the `novnc` package. Only `.js` files
/// under `core/` and `vendor/`, by plain path segments: nothing else of the filesystem.
pub async fn novnc_file(State(s): State<Shared>, Path(path): Path<String>) -> Response {
    let segments: Vec<&str> = path.split('/').collect();
    let plain = segments.iter().all(|seg| {
        !seg.is_empty()
            && !seg.starts_with('.')
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    });
    if !plain || !matches!(segments[0], "core" | "vendor") || !path.ends_with(".js") {
        return (StatusCode::NOT_FOUND, "ferry-console: no such file\n").into_response();
    }
    let file = s.novnc_dir.join(&path);
    match tokio::fs::read(&file).await {
        Ok(js) => (
            [
                (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
                (header::CACHE_CONTROL, "max-age=3600"),
            ],
            js,
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "noVNC file missing (is Debian's novnc package installed?)");
            (StatusCode::NOT_FOUND, "ferry-console: no such file\n").into_response()
        }
    }
}

/// `GET /hosts/{id}/vms/{vm}/screen.png`: the VM's screen now (QMP `screendump` on its
/// host), for thumbnails.
pub async fn screen_png(State(s): State<Shared>, Path((id, vm)): Path<(i64, String)>) -> Response {
    let row = match host_row(&s, id) {
        Ok(r) => r,
        Err(e) => return (StatusCode::NOT_FOUND, e).into_response(),
    };
    match client(&row).get_bytes(&api_vm(&vm, "/screenshot")).await {
        Ok(png) if png.starts_with(b"\x89PNG") => (
            [
                (header::CONTENT_TYPE, "image/png"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            png,
        )
            .into_response(),
        Ok(_) => (StatusCode::BAD_GATEWAY, "the host sent no PNG").into_response(),
        Err(e) => (StatusCode::NOT_FOUND, error_chain(&e)).into_response(),
    }
}

/// The handshake headers relayed to the host as the browser sent them. Extensions
/// (`permessage-deflate`) are not: ferryd offers none, so none are agreed.
const RELAYED: [header::HeaderName; 3] = [
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
    header::SEC_WEBSOCKET_PROTOCOL,
];

/// `GET /hosts/{id}/vms/{vm}/vnc`: the websocket of the Connect view, relayed to the
/// host's `/v1/vms/{vm}/vnc`.
pub async fn vnc_proxy(
    State(s): State<Shared>,
    Path((id, vm)): Path<(i64, String)>,
    mut req: Request,
) -> Response {
    let h = req.headers();
    // Browsers always send Origin on a websocket handshake: one without it, or from
    // another site, is not this console's page.
    if h.get(header::ORIGIN).is_none() || cross_site(h) {
        return (
            StatusCode::FORBIDDEN,
            "ferry-console: refused a websocket from another site\n",
        )
            .into_response();
    }
    if !is_websocket(h) {
        return (
            StatusCode::BAD_REQUEST,
            "ferry-console: this is a websocket endpoint (the Connect view)\n",
        )
            .into_response();
    }
    let relayed: Vec<_> = RELAYED
        .iter()
        .filter_map(|n| h.get(n).map(|v| (n.clone(), v.clone())))
        .collect();
    let row = match host_row(&s, id) {
        Ok(r) => r,
        Err(e) => return (StatusCode::NOT_FOUND, e).into_response(),
    };
    let (reply, upstream) = match client(&row)
        .upgrade_with(&api_vm(&vm, "/vnc"), "websocket", &relayed)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_GATEWAY,
                format!("ferry-console: {vm} on {}: {}\n", row.name, error_chain(&e)),
            )
                .into_response()
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let what = format!("{vm} on {}", row.name);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(browser) => {
                let mut browser = TokioIo::new(browser);
                let mut upstream = upstream;
                let r = tokio::io::copy_bidirectional(&mut browser, &mut upstream).await;
                tracing::debug!(vm = %what, result = ?r, "Connect session ended");
            }
            Err(e) => tracing::warn!(vm = %what, error = %e, "websocket upgrade failed"),
        }
    });
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let out = res.headers_mut();
    out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    out.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    for name in [header::SEC_WEBSOCKET_ACCEPT, header::SEC_WEBSOCKET_PROTOCOL] {
        if let Some(v) = reply.get(&name) {
            out.insert(name, v.clone());
        }
    }
    res
}

fn is_websocket(h: &HeaderMap) -> bool {
    h.get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}
