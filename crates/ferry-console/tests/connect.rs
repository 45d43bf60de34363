//! Connect (the VM's screen in the console) end to end, on one real test guest with a
//! display: `ferry vm screenshot` writes a PNG of the guest's screen; ferryd's screenshot
//! and websocket endpoints refuse a wrong token and bridge to QEMU's VNC with the right
//! one; the console refuses the websocket without a session or from another site; in
//! headless Chromium the VM list shows the screen thumbnail, the Connect view's noVNC
//! canvas shows what a screendump taken at the same moment shows, and keys typed in the
//! page reach the guest (its tty1 echoes them and reports the line on the serial console).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{http, screenshot_dir, start_guest, wait_until, Browser, Console, PASSWORD, USER};
use ferry_client::{Client, ClientError, Endpoint};
use ferry_testkit::guest::GuestWorkload;
use ferry_testkit::host::Host;
use hyper::header::{HeaderName, HeaderValue};

/// A picture reduced to which pixels are lit (text) and which are background: what the
/// guest's VGA text screen (light grey on black) shows, independent of how the VNC
/// encoding or the canvas rounds colours.
#[derive(Debug, Clone, PartialEq)]
struct Mask {
    width: u32,
    height: u32,
    lit: Vec<bool>,
}

impl Mask {
    fn lit_count(&self) -> usize {
        self.lit.iter().filter(|&&l| l).count()
    }

    /// Pixels that differ from `other` (all of them when the sizes differ).
    fn diff(&self, other: &Mask) -> usize {
        if (self.width, self.height) != (other.width, other.height) {
            return self.lit.len().max(other.lit.len());
        }
        self.lit
            .iter()
            .zip(&other.lit)
            .filter(|(a, b)| a != b)
            .count()
    }
}

fn lit(r: u8, g: u8, b: u8) -> bool {
    u32::from(r) + u32::from(g) + u32::from(b) > 150
}

fn png_mask(bytes: &[u8]) -> Mask {
    let mut decoder = png::Decoder::new(bytes);
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("PNG pixels");
    let channels = info.color_type.samples();
    assert!(
        channels >= 3,
        "expected an RGB(A) PNG, got {:?}",
        info.color_type
    );
    let lit = buf[..info.buffer_size()]
        .chunks(channels)
        .map(|p| lit(p[0], p[1], p[2]))
        .collect();
    Mask {
        width: info.width,
        height: info.height,
        lit,
    }
}

/// The noVNC canvas as the page shows it, or `None` before noVNC drew one.
fn canvas_mask(br: &Browser) -> Option<Mask> {
    let v = br.script(
        "const c = document.querySelector('#screen canvas');
         if (!c || c.width === 0) return null;
         const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
         const bits = new Array(c.width * c.height);
         for (let i = 0, j = 0; i < d.length; i += 4, j++) bits[j] = d[i] + d[i+1] + d[i+2] > 150 ? '1' : '0';
         return [c.width, c.height, bits.join('')];",
    );
    let a = v.as_array()?;
    Some(Mask {
        width: a[0].as_u64()? as u32,
        height: a[1].as_u64()? as u32,
        lit: a[2].as_str()?.bytes().map(|b| b == b'1').collect(),
    })
}

/// `ferry vm screenshot` into the host's dir; the PNG's bytes and what the CLI reported.
fn screenshot(host: &Host, vm: &str) -> (Vec<u8>, serde_json::Value) {
    let file = host.dir.path().join(format!("{vm}.png"));
    let v = host.ferry_json(&["vm", "screenshot", vm, file.to_str().unwrap()]);
    (std::fs::read(&file).unwrap(), v)
}

/// At most this share of the screen may differ between the canvas and the screendump
/// (a character cell or two caught mid-update); a blank or different picture differs in
/// thousands of pixels.
const MAX_DIFF: usize = 720 * 400 / 500;

/// Waits until the canvas and a screendump taken right before reading it agree; returns
/// that screendump's mask.
fn canvas_matches_screendump(br: &Browser, host: &Host, vm: &str) -> Mask {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (png, _) = screenshot(host, vm);
        let dump = png_mask(&png);
        let canvas = canvas_mask(br);
        let diff = canvas.as_ref().map_or(usize::MAX, |c| c.diff(&dump));
        if diff <= MAX_DIFF {
            return dump;
        }
        assert!(
            Instant::now() < deadline,
            "the canvas ({:?}, {} lit) does not show the guest's screen ({}x{}, {} lit): {diff} pixels differ",
            canvas.as_ref().map(|c| (c.width, c.height)),
            canvas.as_ref().map_or(0, Mask::lit_count),
            dump.width,
            dump.height,
            dump.lit_count(),
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A websocket handshake by hand; the status, the head and whatever came within a second
/// after it (the first frames).
fn ws_handshake(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before an answer: {raw:?}");
        raw.extend_from_slice(&buf[..n]);
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut rest = raw[head_end..].to_vec();
    if status == 101 {
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while rest.len() < 14 && Instant::now() < deadline {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => rest.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
    }
    (status, head, rest)
}

/// QEMU's RFB greeting in the first (unmasked, binary) websocket frame.
fn is_rfb_greeting(frames: &[u8]) -> bool {
    frames.len() >= 14 && frames[0] == 0x82 && &frames[2..14] == b"RFB 003.008\n"
}

#[test]
fn connect_shows_the_guest_screen_and_takes_its_keys() {
    let a = Host::start("site-a", "127.0.0.1", "accel = \"tcg\"");
    start_guest(&a, "app", 7);
    let (token, fp) = a.credentials();

    // A VM without a display says so, and a screenshot of a VM that is off writes nothing.
    a.create_guest_vm(
        "plain",
        GuestWorkload {
            seed: 1,
            start: 1,
            span_blocks: 8,
        },
        1.0,
        &["--memory", "128M", "--no-vnc"],
    );
    assert_eq!(a.ferry_json(&["vm", "show", "plain"])["vnc"], false);
    assert_eq!(a.ferry_json(&["vm", "show", "app"])["vnc"], true);
    let nothing = a.dir.path().join("nothing.png");
    let err = a.ferry_err(&["vm", "screenshot", "plain", nothing.to_str().unwrap()]);
    assert!(err.contains("plain"), "{err}");
    assert!(!nothing.exists());

    // `ferry vm screenshot`: a PNG of the VGA text screen (720x400) once the guest drew
    // its pattern on it.
    let mut shot = (Vec::new(), serde_json::Value::Null);
    wait_until(
        "the guest's screen pattern",
        Duration::from_secs(60),
        || {
            shot = screenshot(&a, "app");
            let m = png_mask(&shot.0);
            m.lit_count() > 720 * 400 / 30
        },
    );
    let (png, reported) = shot;
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let first = png_mask(&png);
    assert_eq!((first.width, first.height), (720, 400));
    assert_eq!(reported["width"], 720);
    assert_eq!(reported["height"], 400);
    assert_eq!(reported["bytes"], png.len());

    // ferryd's TLS API: no screen and no VNC without the token; the RFB stream with it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tls = |token: &str| {
        Client::new(Endpoint::Tls {
            addr: a.tls_addr.clone(),
            fingerprint: fp.clone(),
            token: token.to_owned(),
        })
    };
    let ws_headers = [
        (
            HeaderName::from_static("sec-websocket-key"),
            HeaderValue::from_static(WS_KEY),
        ),
        (
            HeaderName::from_static("sec-websocket-version"),
            HeaderValue::from_static("13"),
        ),
    ];
    rt.block_on(async {
        for bad in ["", "wrong"] {
            let c = tls(bad);
            let e = c.get_bytes("/v1/vms/app/screenshot").await.unwrap_err();
            assert!(matches!(e, ClientError::Api { status: 401, .. }), "{e}");
            let e = c
                .upgrade_with("/v1/vms/app/vnc", "websocket", &ws_headers)
                .await
                .err()
                .expect("refused");
            assert!(matches!(e, ClientError::Api { status: 401, .. }), "{e}");
        }
        let c = tls(&token);
        let png = c.get_bytes("/v1/vms/app/screenshot").await.unwrap();
        assert_eq!(
            png_mask(&png).diff(&first),
            0,
            "the screen changed by itself"
        );
        let (reply, mut stream) = c
            .upgrade_with("/v1/vms/app/vnc", "websocket", &ws_headers)
            .await
            .unwrap();
        // RFC 6455's sample key and its accept value.
        assert_eq!(
            reply.get("sec-websocket-accept").unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        let mut frames = vec![0u8; 14];
        tokio::io::AsyncReadExt::read_exact(&mut stream, &mut frames)
            .await
            .unwrap();
        assert!(is_rfb_greeting(&frames), "{frames:?}");
        // A plain GET is told what the endpoint is for.
        let e = c.get_bytes("/v1/vms/app/vnc").await.unwrap_err();
        assert!(
            matches!(e, ClientError::Api { status: 400, .. })
                && e.to_string().contains("websocket"),
            "{e}"
        );
        // A VM without a display (or off) gets no websocket.
        let e = c
            .upgrade_with("/v1/vms/plain/vnc", "websocket", &ws_headers)
            .await
            .err()
            .expect("refused");
        assert!(matches!(e, ClientError::Api { status: 409, .. }), "{e}");
    });

    // The console with this host.
    let console = Console::start(2);
    let base = format!("http://{}", console.addr);
    let cookie = console.login();
    let to = console.post(
        &cookie,
        "/hosts",
        &[
            ("url", &format!("https://{}", a.tls_addr)),
            ("fingerprint", &fp),
            ("token", &token),
        ],
    );
    assert!(to.contains("ok="), "{to}");
    let vm_url = wait_for_vm_link(&console, &cookie);

    // Without a session nothing of it is reached; from another site's page neither.
    let own_origin = base.as_str();
    let ws_path = format!("{vm_url}/vnc");
    let (status, head, _) = ws_handshake(&console.addr, &ws_path, &[("Origin", own_origin)]);
    assert_eq!(status, 303, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("location: /login"),
        "{head}"
    );
    for path in [
        format!("{vm_url}/screen.png"),
        format!("{vm_url}/connect"),
        "/novnc/core/rfb.js".to_owned(),
    ] {
        let r = http(&console.addr, "GET", &path, &[], "");
        assert_eq!(r.status, 303, "{path}: {r:?}");
    }
    let (status, head, _) = ws_handshake(
        &console.addr,
        &ws_path,
        &[("Origin", "http://evil.example"), ("Cookie", &cookie)],
    );
    assert_eq!(status, 403, "{head}");
    let (status, head, _) = ws_handshake(&console.addr, &ws_path, &[("Cookie", &cookie)]);
    assert_eq!(status, 403, "a websocket without Origin: {head}");
    let (status, head, frames) = ws_handshake(
        &console.addr,
        &ws_path,
        &[("Origin", own_origin), ("Cookie", &cookie)],
    );
    assert_eq!(status, 101, "{head}");
    assert!(is_rfb_greeting(&frames), "{frames:?}");
    // noVNC's files: only its modules, nothing else of the disk.
    let r = http(
        &console.addr,
        "GET",
        "/novnc/core/rfb.js",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(
        r.status, 200,
        "noVNC is missing: scripts/install-deps.sh installs Debian's novnc"
    );
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/javascript"));
    for path in [
        "/novnc/core/../../../etc/passwd",
        "/novnc/app/ui.js",
        "/novnc/vnc.html",
    ] {
        let r = http(&console.addr, "GET", path, &[("Cookie", &cookie)], "");
        assert_eq!(r.status, 404, "{path}");
    }
    // Scripts and the websocket are allowed on the Connect page only.
    let page = http(&console.addr, "GET", &vm_url, &[("Cookie", &cookie)], "");
    let csp = page.header("content-security-policy").unwrap();
    assert!(!csp.contains("script-src"), "{csp}");
    let page = http(
        &console.addr,
        "GET",
        &format!("{vm_url}/connect"),
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(page.status, 200, "{page:?}");
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    // Connect to a VM that is off says so on its page.
    let r = http(
        &console.addr,
        "GET",
        &vm_url.replace("/vms/app", "/vms/plain/connect"),
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(r.status, 303, "{r:?}");
    assert!(r.header("location").unwrap().contains("err="), "{r:?}");

    // In the browser: the thumbnail, then Connect.
    let shots = screenshot_dir(&console);
    let br = Browser::start();
    br.goto(&format!("{base}/login"));
    br.fill("#user", USER);
    br.fill("#password", PASSWORD);
    br.click("#login");
    br.goto(&format!("{base}/vms"));
    wait_until("the screen thumbnail", Duration::from_secs(30), || {
        br.script(
            "const i = document.querySelector(\"tr[data-vm='app'] img.thumb\");
             return i && i.complete ? i.naturalWidth : 0;",
        ) == 720
    });
    assert_eq!(br.count("tr[data-vm='plain'] img.thumb"), 0);
    br.screenshot(&shots.join("vms-thumbnails.png"));
    br.click("tr[data-vm='app'] a[href$='/vms/app']");
    br.click("#connect");
    wait_until("noVNC to connect", Duration::from_secs(30), || {
        br.text("#vnc-status") == "connected"
    });
    let before = canvas_matches_screendump(&br, &a, "app");
    assert_eq!(before.diff(&first), 0, "the screen changed by itself");
    br.screenshot(&shots.join("connect.png"));

    // A line typed in the page reaches the guest: tty1 echoes it on the screen and the
    // guest reports it on its serial console.
    br.script("document.querySelector('#screen canvas').focus();");
    br.keys("ferry42\n");
    a.wait_console("app", Duration::from_secs(30), "the typed line", |c| {
        c.contains("GUEST: TTY1 ferry42")
    });
    let after = canvas_matches_screendump(&br, &a, "app");
    assert!(
        after.diff(&before) > 100,
        "the typed text is not on the screen ({} pixels changed)",
        after.diff(&before)
    );
    assert_eq!(br.text("#vnc-status"), "connected");
}

/// The VM page's path of `app` once the poller listed it.
fn wait_for_vm_link(console: &Console, cookie: &str) -> String {
    let mut link = String::new();
    wait_until(
        "the VM in the console's list",
        Duration::from_secs(30),
        || {
            let page = console.get(cookie, "/vms");
            link = page
                .split("href=\"")
                .skip(1)
                .filter_map(|s| s.split('"').next())
                .find(|l| l.starts_with("/hosts/") && l.ends_with("/vms/app"))
                .unwrap_or_default()
                .to_owned();
            !link.is_empty()
        },
    );
    link
}
