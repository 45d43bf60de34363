//! Hyper-V Manager's everyday comforts, without page scripts: the New Virtual Machine form,
//! status fragments that refresh by themselves (a small page with `<meta http-equiv=
//! "refresh">` in an `<iframe>`, so a form on the page around it keeps what it holds), and
//! the confirmation page every destructive action passes through (a GET that says what
//! will be lost, and a button that POSTs the action).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use ferry_api_types::{
    parse_size, BootDevice, CdromSpec, DiskBus, DiskRequest, Firmware, ImageFormat, Machine,
    NicRequest, ReplicationHealthInfo, ReplicationInfo, VmCreateRequest, VmInfo,
};

use super::pages::{api_vm, back, host_row, page, vm_url};
use super::{esc, fmt_secs, Shared, User};
use crate::hosts::{client, error_chain};

// ---- New virtual machine ------------------------------------------------------------------

/// How many disk rows the form offers (more are added later with the CLI).
const DISK_ROWS: usize = 2;

/// The form's fields as the user typed them (kept when the host refuses the VM).
type Fields = HashMap<String, String>;

fn field<'a>(f: &'a Fields, k: &str) -> &'a str {
    f.get(k).map(|v| v.trim()).unwrap_or("")
}

fn on(f: &Fields, k: &str) -> bool {
    matches!(field(f, k), "on" | "true")
}

/// `GET /hosts/{id}/create-vm`: the form, with the CLI's defaults.
pub async fn create_form(
    State(s): State<Shared>,
    Extension(user): Extension<User>,
    Path(id): Path<i64>,
) -> Response {
    let row = match host_row(&s, id) {
        Ok(r) => r,
        Err(e) => return back("/hosts", Err(e)),
    };
    let defaults: Fields = [
        ("cpus", "1"),
        ("memory", "512M"),
        ("disk0_size", "8G"),
        ("vnc", "on"),
        ("network", "user"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    page(
        &format!("New virtual machine on {}", row.name),
        &user,
        create_body(id, &defaults, None),
    )
    .into_response()
}

/// `POST /hosts/{id}/create-vm`: builds the CLI's `VmCreateRequest` and sends it to the
/// host; on success the new VM's page, else the form again with the one-line reason and
/// everything the user typed.
pub async fn create_vm(
    State(s): State<Shared>,
    Extension(user): Extension<User>,
    Path(id): Path<i64>,
    Form(f): Form<Fields>,
) -> Response {
    let row = match host_row(&s, id) {
        Ok(r) => r,
        Err(e) => return back("/hosts", Err(e)),
    };
    let result = match create_request(&f) {
        Ok(req) => client(&row)
            .post::<_, VmInfo>("/v1/vms", &req)
            .await
            .map_err(|e| error_chain(&e)),
        Err(e) => Err(e),
    };
    match result {
        Ok(info) => {
            s.poller.poll_soon();
            back(
                &vm_url(id, &info.name),
                Ok(format!("VM {} created on {}", info.name, row.name)),
            )
        }
        Err(e) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            page(
                &format!("New virtual machine on {}", row.name),
                &user,
                create_body(id, &f, Some(&e)),
            ),
        )
            .into_response(),
    }
}

/// The request the CLI's `ferry vm create` would send for these fields.
fn create_request(f: &Fields) -> Result<VmCreateRequest, String> {
    let name = field(f, "name").to_owned();
    if name.is_empty() {
        return Err("name: give the new VM a name".into());
    }
    let cpus: u32 = field(f, "cpus")
        .parse()
        .map_err(|_| format!("CPUs {:?}: use a whole number", field(f, "cpus")))?;
    let memory = field(f, "memory");
    let memory_mib = parse_size(memory).map_err(|e| format!("memory: {e}"))? >> 20;
    let mut disks = Vec::new();
    for i in 0..DISK_ROWS {
        let size = field(f, &format!("disk{i}_size"));
        let path = field(f, &format!("disk{i}_path"));
        let bus = match field(f, &format!("disk{i}_bus")) {
            "" | "virtio-blk" => DiskBus::VirtioBlk,
            "virtio-scsi" => DiskBus::VirtioScsi,
            b => {
                return Err(format!(
                    "disk {i}: unknown bus {b:?}; use virtio-blk or virtio-scsi"
                ))
            }
        };
        let format = match field(f, &format!("disk{i}_format")) {
            "" | "auto" => None,
            "qcow2" => Some(ImageFormat::Qcow2),
            "raw" => Some(ImageFormat::Raw),
            x => return Err(format!("disk {i}: unknown format {x:?}; use qcow2 or raw")),
        };
        match (size.is_empty(), path.is_empty()) {
            (true, true) => {}
            (false, false) => {
                return Err(format!(
                "disk {i}: give a size for a new disk or the path of an existing image, not both"
            ))
            }
            (false, true) => disks.push(DiskRequest::New {
                size_bytes: parse_size(size).map_err(|e| format!("disk {i}: {e}"))?,
                bus,
            }),
            (true, false) => disks.push(DiskRequest::Import {
                path: path.to_owned(),
                format,
                bus,
            }),
        }
    }
    let iso = field(f, "iso");
    let cdrom = match (iso.is_empty(), on(f, "cd_drive")) {
        (false, _) => Some(CdromSpec {
            iso: Some(iso.to_owned()),
        }),
        (true, true) => Some(CdromSpec { iso: None }),
        (true, false) => None,
    };
    let nics = match field(f, "network") {
        "" | "none" => Vec::new(),
        "user" => vec![NicRequest::User],
        "bridge" => {
            let br = field(f, "bridge");
            vec![NicRequest::Bridge {
                bridge: (!br.is_empty()).then(|| br.to_owned()),
            }]
        }
        n => return Err(format!("network {n:?}: use none, user or bridge")),
    };
    let boot_order = field(f, "boot")
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| {
            BootDevice::parse(d).ok_or_else(|| {
                format!("boot order: unknown device {d:?}; use cdrom, disk and network")
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(VmCreateRequest {
        name,
        cpus,
        memory_mib,
        disks,
        kernel: None,
        initrd: None,
        append: None,
        vnc: Some(on(f, "vnc")),
        nics,
        machine: match field(f, "machine") {
            "" | "pc" => Machine::Pc,
            "q35" => Machine::Q35,
            m => return Err(format!("machine {m:?}: use pc or q35")),
        },
        firmware: match field(f, "firmware") {
            "" | "bios" => Firmware::Bios,
            "uefi" => Firmware::Uefi,
            x => return Err(format!("firmware {x:?}: use bios or uefi")),
        },
        secure_boot: on(f, "secure_boot"),
        cdrom,
        boot_order,
        rng: on(f, "rng"),
        nvram: None,
    })
}

/// The form, filled with `f` (defaults or what the user sent), and the host's error.
fn create_body(id: i64, f: &Fields, error: Option<&str>) -> String {
    let v = |k: &str| esc(field(f, k));
    let checked = |k: &str| if on(f, k) { " checked" } else { "" };
    let select = |name: &str, id: &str, options: &[(&str, &str)]| {
        let cur = field(f, name);
        let mut s = format!(r#"<select name="{name}" id="{id}">"#);
        for (value, label) in options {
            let sel = if cur == *value { " selected" } else { "" };
            s.push_str(&format!(r#"<option value="{value}"{sel}>{label}</option>"#));
        }
        s.push_str("</select>");
        s
    };
    let mut out = String::new();
    if let Some(e) = error {
        out.push_str(&format!(r#"<p class="error" id="form-err">{}</p>"#, esc(e)));
    }
    out.push_str(&format!(
        r#"<form method="post" action="/hosts/{id}/create-vm" id="create-vm"><fieldset><legend>Name and hardware</legend>
<label>Name <input name="name" id="vm-name" value="{name}" required></label>
<label>CPUs <input name="cpus" id="vm-cpus" value="{cpus}" size="4"></label>
<label>Memory <input name="memory" id="vm-memory" value="{memory}" size="8" placeholder="512M"></label>
<label>Machine {machine}</label>
<label>Firmware {firmware} <label class="inline"><input type="checkbox" name="secure_boot" id="vm-secure-boot"{sb}> Secure Boot (UEFI on q35)</label></label>
<label><input type="checkbox" name="vnc" id="vm-vnc"{vnc}> Display (VNC, reached through Connect)</label>
<label><input type="checkbox" name="rng" id="vm-rng"{rng}> Random number generator (virtio-rng)</label>
</fieldset><fieldset><legend>Disks</legend><p>Each row: a new disk's size (e.g. 8G), or the path of an existing qcow2 or raw image on the host (inside its file roots).</p>"#,
        name = v("name"),
        cpus = v("cpus"),
        memory = v("memory"),
        machine = select("machine", "vm-machine", &[("pc", "pc (i440FX)"), ("q35", "q35 (PCI Express)")]),
        firmware = select("firmware", "vm-firmware", &[("bios", "BIOS"), ("uefi", "UEFI")]),
        sb = checked("secure_boot"),
        vnc = checked("vnc"),
        rng = checked("rng"),
    ));
    for i in 0..DISK_ROWS {
        out.push_str(&format!(
            r#"<p class="disk-row"><label class="inline">Disk {i}: new, size <input name="disk{i}_size" id="disk{i}-size" value="{size}" size="6"></label> <label class="inline">or existing image <input name="disk{i}_path" id="disk{i}-path" value="{path}" size="40"></label> <label class="inline">format {format}</label> <label class="inline">bus {bus}</label></p>"#,
            size = v(&format!("disk{i}_size")),
            path = v(&format!("disk{i}_path")),
            format = select(
                &format!("disk{i}_format"),
                &format!("disk{i}-format"),
                &[("auto", "by name"), ("qcow2", "qcow2"), ("raw", "raw")]
            ),
            bus = select(
                &format!("disk{i}_bus"),
                &format!("disk{i}-bus"),
                &[("virtio-blk", "virtio-blk"), ("virtio-scsi", "virtio-scsi")]
            ),
        ));
    }
    out.push_str(&format!(
        r#"</fieldset><fieldset><legend>CD drive and boot</legend>
<label>ISO (path on the host) <input name="iso" id="vm-iso" value="{iso}" size="50"></label>
<label><input type="checkbox" name="cd_drive" id="vm-cd-drive"{cd}> an empty CD drive when no ISO is given</label>
<label>Boot order <input name="boot" id="vm-boot" value="{boot}" placeholder="e.g. cdrom,disk (default: the first disk)"></label>
</fieldset><fieldset><legend>Network</legend>
<label>{network} <label class="inline">bridge <input name="bridge" id="vm-bridge" value="{bridge}" placeholder="the host's default"></label></label>
</fieldset><button type="submit" id="create-vm-submit">Create VM</button></form>"#,
        iso = v("iso"),
        cd = checked("cd_drive"),
        boot = v("boot"),
        network = select(
            "network",
            "vm-network",
            &[("none", "no network"), ("user", "user-mode (NAT)"), ("bridge", "a bridge")]
        ),
        bridge = v("bridge"),
    ));
    out
}

// ---- status fragment ----------------------------------------------------------------------

/// Seconds between refreshes of a status fragment.
pub const STATUS_REFRESH_S: u32 = 5;

/// The fragment's policy: the base one, except that it may be framed by this console's
/// own pages (and still runs no script).
const FRAGMENT_CSP: &str = concat!(
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; ",
    "frame-ancestors 'self'; base-uri 'none'"
);

/// The `<iframe>` of a VM's status fragment, for its page.
pub fn status_frame(id: i64, vm: &str) -> String {
    format!(
        r#"<iframe id="status-frame" title="live status" src="{}/status" style="border:1px solid #d5d8de;background:#fff;width:100%;height:64px"></iframe>"#,
        vm_url(id, vm)
    )
}

/// `GET /hosts/{id}/vms/{vm}/status`: a small page with the VM's state, replication state,
/// health and progress, read live from its host, that reloads itself every few seconds.
pub async fn vm_status(State(s): State<Shared>, Path((id, vm)): Path<(i64, String)>) -> Response {
    let body = match host_row(&s, id) {
        Err(e) => format!(
            r#"<span class="error" id="status-error">{}</span>"#,
            esc(&e)
        ),
        Ok(row) => {
            let c = client(&row);
            match c.get::<VmInfo>(&api_vm(&vm, "")).await {
                Err(e) => format!(
                    r#"<span class="error" id="status-error">{}</span>"#,
                    esc(&error_chain(&e))
                ),
                Ok(info) => {
                    let rep: Option<ReplicationInfo> =
                        c.get(&api_vm(&vm, "/replication")).await.ok();
                    let h: Option<ReplicationHealthInfo> = match rep {
                        Some(_) => c.get(&api_vm(&vm, "/replication/health")).await.ok(),
                        None => None,
                    };
                    let mut s = format!(
                        r#"State <b id="status-state">{}</b> · uptime <span id="status-uptime">{}</span>"#,
                        esc(&info.state.to_string()),
                        info.uptime_s
                            .map(|u| fmt_secs(u as i64))
                            .unwrap_or_else(|| "-".into()),
                    );
                    match &rep {
                        None => s.push_str(r#" · replication <span id="status-replication">not enabled</span>"#),
                        Some(r) => s.push_str(&format!(
                            r#" · replication <span id="status-replication">{} ({})</span> · health <span id="status-health">{}</span> · progress <span id="status-progress">{}</span>"#,
                            esc(&r.state_label),
                            esc(&r.role),
                            esc(&h.map(|h| h.health.to_uppercase()).unwrap_or_else(|| "-".into())),
                            r.progress
                                .as_ref()
                                .map(|p| format!("{} {}%", esc(&p.phase), p.percent))
                                .unwrap_or_else(|| "-".into()),
                        )),
                    }
                    if let Some(e) = &info.last_error {
                        s.push_str(&format!(
                            r#" · <span class="error" id="status-last-error">{}</span>"#,
                            esc(e)
                        ));
                    }
                    s
                }
            }
        }
    };
    fragment(&body)
}

/// The `<iframe>` of the fleet's status fragment (hosts and alerts pages, which hold forms).
pub fn fleet_frame() -> String {
    r#"<iframe id="status-frame" title="live status" src="/status" style="border:1px solid #d5d8de;background:#fff;width:100%;height:64px"></iframe>"#.to_owned()
}

/// `GET /status`: each host's reachability and the active alerts, from the poller's
/// latest snapshot; reloads itself.
pub async fn fleet_status(State(s): State<Shared>) -> Response {
    let fleet = s.poller.fleet.read().await;
    let hosts: Vec<String> = fleet
        .hosts
        .values()
        .map(|v| {
            let status = match (&v.error, v.polled_at) {
                (Some(e), _) => format!(r#"<span class="error">UNREACHABLE</span> ({})"#, esc(e)),
                (None, 0) => "not polled yet".to_owned(),
                (None, _) => format!("reachable, {} VMs", v.vms.len()),
            };
            format!(
                r#"<span data-host="{name}">{name}: {status}</span>"#,
                name = esc(&v.row.name)
            )
        })
        .collect();
    let active = s.store.alerts(0).map(|(a, _)| a).unwrap_or_default();
    let alerts: Vec<String> = active
        .iter()
        .take(5)
        .map(|a| {
            esc(&format!(
                "{} {}{}",
                a.rule,
                a.host,
                a.vm.as_deref().map(|v| format!("/{v}")).unwrap_or_default()
            ))
        })
        .collect();
    fragment(&format!(
        r#"Hosts: {} · active alerts: <b id="status-alerts">{}</b>{}"#,
        if hosts.is_empty() {
            "none".to_owned()
        } else {
            hosts.join(" · ")
        },
        active.len(),
        if alerts.is_empty() {
            String::new()
        } else {
            format!(" ({})", alerts.join(", "))
        }
    ))
}

/// A status fragment page around `body`: reloads itself, may be framed by the console's
/// own pages, never cached.
fn fragment(body: &str) -> Response {
    let html = format!(
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{STATUS_REFRESH_S}"><title>status</title><style>body{{font-family:system-ui,sans-serif;font-size:14px;margin:6px;color:#222}}.error{{color:#b00020;font-weight:bold}}</style></head><body><div id="status">{body}</div> <small>(refreshes every {STATUS_REFRESH_S} s; {at} UTC)</small></body></html>"#,
        at = super::fmt_clock(crate::now()),
    );
    let mut res = Html(html).into_response();
    let h = res.headers_mut();
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(FRAGMENT_CSP),
    );
    h.insert("x-frame-options", HeaderValue::from_static("SAMEORIGIN"));
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    res
}

// ---- confirmation of destructive actions --------------------------------------------------

/// Whether an action destroys something (state, points, a VM, a checkpoint) and so must be
/// confirmed first.
pub fn destructive(action: &str) -> bool {
    matches!(
        action,
        "planned"
            | "failover"
            | "cancel"
            | "complete"
            | "remove"
            | "delete"
            | "cp_apply"
            | "cp_delete"
    )
}

/// The confirmation page's URL for an action's fields (the action's own form GETs it).
pub fn confirm_url(id: i64, vm: &str, f: &Fields) -> String {
    let q: Vec<String> = f
        .iter()
        .filter(|(k, _)| k.as_str() != "confirmed")
        .map(|(k, v)| format!("{}={}", super::url_enc(k), super::url_enc(v)))
        .collect();
    format!("{}/confirm?{}", vm_url(id, vm), q.join("&"))
}

/// `GET /hosts/{id}/vms/{vm}/confirm?action=…`: what the action will do and lose, a button
/// that POSTs it (with `confirmed`), and a way back that does nothing.
pub async fn confirm_page(
    State(s): State<Shared>,
    Extension(user): Extension<User>,
    Path((id, vm)): Path<(i64, String)>,
    Query(f): Query<Fields>,
) -> Response {
    let action = field(&f, "action").to_owned();
    if !destructive(&action) {
        return back(&vm_url(id, &vm), Err(format!("unknown action {action:?}")));
    }
    let row = match host_row(&s, id) {
        Ok(r) => r,
        Err(e) => return back("/vms", Err(e)),
    };
    let c = client(&row);
    let rep: Option<ReplicationInfo> = c.get(&api_vm(&vm, "/replication")).await.ok();
    let checkpoint_name = match f.get("checkpoint") {
        Some(cp) => c
            .get::<ferry_api_types::CheckpointList>(&api_vm(&vm, "/checkpoints"))
            .await
            .ok()
            .and_then(|l| {
                l.checkpoints
                    .into_iter()
                    .find(|c| c.id.to_string() == *cp)
                    .map(|c| c.name)
            })
            .unwrap_or_else(|| cp.clone()),
        None => String::new(),
    };
    let (title, text) = consequences(&action, &vm, &row.name, rep.as_ref(), &f, &checkpoint_name);
    let hidden: String = f
        .iter()
        .filter(|(k, _)| k.as_str() != "confirmed")
        .map(|(k, v)| {
            format!(
                r#"<input type="hidden" name="{}" value="{}">"#,
                esc(k),
                esc(v)
            )
        })
        .collect();
    let tab = if action.starts_with("cp_") {
        "checkpoints"
    } else if action == "delete" {
        "overview"
    } else {
        "replication"
    };
    let body = format!(
        r#"<fieldset id="confirmation"><legend>{title}</legend><p id="confirm-text">{text}</p>
<form method="post" action="{url}/action" class="inline">{hidden}<input type="hidden" name="confirmed" value="yes"><button type="submit" id="confirm">{title}</button></form>
<a href="{url}?tab={tab}" id="confirm-cancel">Cancel (change nothing)</a></fieldset>"#,
        title = esc(&title),
        text = esc(&text),
        url = vm_url(id, &vm),
    );
    page(&format!("Confirm: {title}"), &user, body).into_response()
}

/// The action's name and what it does and loses, in the user's words.
fn consequences(
    action: &str,
    vm: &str,
    host: &str,
    rep: Option<&ReplicationInfo>,
    f: &Fields,
    checkpoint: &str,
) -> (String, String) {
    let partner = rep.map(|r| r.partner.as_str()).unwrap_or("the partner");
    let point = match field(f, "point") {
        "" | "latest" => "the latest recovery point".to_owned(),
        p => format!("recovery point #{p}"),
    };
    match action {
        "planned" => (
            "Planned failover".into(),
            format!(
                "VM {vm} on {host} is shut down, its last changes are sent to {partner}, and it fails over there{}{}. It is unavailable until it runs on {partner}; {host} then holds only a replica of it.",
                if on(f, "start") { " and starts" } else { "" },
                if on(f, "reverse") { ", with replication reversed back to this host" } else { "" },
            ),
        ),
        "failover" => (
            "Failover".into(),
            format!(
                "VM {vm} on {host} is brought up from {point}{}: everything the primary ({partner}) wrote after that point is not on this replica and is lost to it, and replication from the primary stops.{}",
                if on(f, "start") { " and started" } else { "" },
                if on(f, "force") { " Forced: even though the primary may still be running and sending." } else { "" },
            ),
        ),
        "cancel" => (
            "Cancel failover".into(),
            match rep.map(|r| r.role.as_str()) {
                Some("primary") => format!(
                    "The failover of VM {vm} prepared on {host} is cancelled: the VM stays on this host and replication to {partner} resumes."
                ),
                _ => format!(
                    "The VM that the failover made on {host} is turned off and discarded, with every change made in it since the failover; {vm} goes back to being a replica of {partner}."
                ),
            },
        ),
        "complete" => (
            "Complete failover".into(),
            format!(
                "The failover of VM {vm} on {host} is made final: every other recovery point is deleted, and the failover can no longer be cancelled or moved to another point."
            ),
        ),
        "remove" => (
            "Remove replication".into(),
            format!(
                "Replication of VM {vm} is removed on {host}: its settings and statistics{} are deleted (the VM itself stays). Replicating it again needs a new initial copy.",
                if rep.is_some_and(|r| r.role == "replica") { " and all its recovery points" } else { "" },
            ),
        ),
        "delete" => (
            "Delete VM".into(),
            format!(
                "VM {vm} is deleted from {host} with all its disks, checkpoints and firmware variables. This cannot be undone (existing images it uses in place are left alone)."
            ),
        ),
        "cp_apply" => (
            "Apply checkpoint".into(),
            format!(
                "VM {vm} is turned off and goes back to checkpoint {checkpoint}: {}",
                if on(f, "checkpoint_first") {
                    "its current state is first saved as a new checkpoint."
                } else {
                    "everything it wrote since that checkpoint is lost (no checkpoint of the current state is taken)."
                }
            ),
        ),
        "cp_delete" => (
            "Delete checkpoint".into(),
            format!(
                "Checkpoint {checkpoint} of VM {vm}{} is deleted: the VM can no longer go back to it. The VM's current state is kept.",
                if on(f, "subtree") { " and every checkpoint under it" } else { "" },
            ),
        ),
        other => (other.to_owned(), String::new()),
    }
}

/// For an unconfirmed destructive POST (a form from an older page, a script): the
/// confirmation page instead of the action.
pub fn to_confirmation(id: i64, vm: &str, f: &Fields) -> Response {
    Redirect::to(&confirm_url(id, vm, f)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Fields {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn create_request_is_the_clis() {
        let r = create_request(&fields(&[
            ("name", "web1"),
            ("cpus", "2"),
            ("memory", "1G"),
            ("disk0_size", "8G"),
            ("disk1_path", "/srv/images/data.raw"),
            ("disk1_format", "raw"),
            ("disk1_bus", "virtio-scsi"),
            ("iso", "/srv/iso/debian.iso"),
            ("firmware", "uefi"),
            ("machine", "q35"),
            ("secure_boot", "on"),
            ("network", "bridge"),
            ("bridge", "br0"),
            ("boot", "cdrom,disk"),
        ]))
        .unwrap();
        assert_eq!(r.cpus, 2);
        assert_eq!(r.memory_mib, 1024);
        assert_eq!(r.disks.len(), 2);
        assert!(matches!(
            r.disks[1],
            DiskRequest::Import {
                format: Some(ImageFormat::Raw),
                bus: DiskBus::VirtioScsi,
                ..
            }
        ));
        assert_eq!(r.firmware, Firmware::Uefi);
        assert_eq!(r.machine, Machine::Q35);
        assert!(r.secure_boot);
        assert_eq!(r.vnc, Some(false));
        assert_eq!(
            r.nics,
            vec![NicRequest::Bridge {
                bridge: Some("br0".into())
            }]
        );
        assert_eq!(r.boot_order, vec![BootDevice::Cdrom, BootDevice::Disk]);
        assert_eq!(r.cdrom.unwrap().iso.as_deref(), Some("/srv/iso/debian.iso"));
        for (k, v, want) in [
            ("cpus", "x", "CPUs"),
            ("memory", "lots", "memory"),
            ("disk0_path", "/srv/a.qcow2", "not both"),
            ("machine", "isapc", "machine"),
            ("boot", "floppy", "floppy"),
        ] {
            let mut f = fields(&[
                ("name", "a"),
                ("cpus", "1"),
                ("memory", "1G"),
                ("disk0_size", "1G"),
            ]);
            f.insert(k.into(), v.into());
            let e = create_request(&f).unwrap_err();
            assert!(e.contains(want), "{k}={v}: {e}");
            assert_eq!(e.lines().count(), 1);
        }
    }

    #[test]
    fn the_form_keeps_what_was_typed() {
        let f = fields(&[
            ("name", "<web>"),
            ("cpus", "3"),
            ("firmware", "uefi"),
            ("vnc", "on"),
        ]);
        let html = create_body(1, &f, Some("bad ISO"));
        assert!(html.contains(r#"value="&lt;web&gt;""#));
        assert!(html.contains(r#"value="3""#));
        assert!(html.contains(r#"<option value="uefi" selected>"#));
        assert!(html.contains(r#"id="vm-vnc" checked"#));
        assert!(html.contains(r#"id="form-err">bad ISO<"#));
    }

    #[test]
    fn destructive_actions_say_what_is_lost() {
        for a in [
            "planned",
            "failover",
            "cancel",
            "complete",
            "remove",
            "delete",
            "cp_apply",
            "cp_delete",
        ] {
            assert!(destructive(a));
            let (_, text) = consequences(a, "app", "site-a", None, &Fields::new(), "cp1");
            assert!(!text.is_empty(), "{a}");
        }
        for a in [
            "start",
            "shutdown",
            "suspend",
            "cp_create",
            "test_failover",
            "stop_test",
        ] {
            assert!(!destructive(a), "{a}");
        }
        let url = confirm_url(
            1,
            "a b",
            &fields(&[("action", "delete"), ("confirmed", "yes")]),
        );
        assert_eq!(url, "/hosts/1/vms/a%20b/confirm?action=delete");
    }
}
