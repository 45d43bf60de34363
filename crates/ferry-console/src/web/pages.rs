//! The pages and the actions behind their forms. Lists and the dashboard read the poller's
//! snapshot; a VM's page reads its host live (so an action's result shows at once). Every
//! action goes to the host through ferryd's public API, exactly as the CLI sends it, and
//! comes back to the page with the host's one-line answer.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, Query, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use ferry_api_types::{
    ActionReply, CheckpointCreated, CheckpointInfo, CheckpointList, EnableReplicationRequest,
    EventInfo, RecoveryPointInfo, ReplicaServerInfo, ReplicationHealthInfo, ReplicationInfo,
    ServerInfo, ShutdownRequest, VmInfo,
};
use ferry_client::{normalize_fingerprint, Client, Endpoint};
use serde::Deserialize;

use super::charts::{line_chart, rates, Unit};
use super::{esc, fmt_bytes, fmt_secs, fmt_time, layout, url_enc, Shared, User};
use crate::alerts::{delivery, AlertSettings, SETTINGS_KEY};
use crate::hosts::{client, error_chain, url_addr, HostView};
use crate::store::HostRow;

/// `?ok=` / `?err=`: the outcome of the action that redirected here.
#[derive(Deserialize, Default)]
pub struct Flash {
    ok: Option<String>,
    err: Option<String>,
    tab: Option<String>,
}

fn flash(f: &Flash) -> String {
    let mut s = String::new();
    if let Some(m) = &f.ok {
        s.push_str(&format!(r#"<p class="ok" id="flash-ok">{}</p>"#, esc(m)));
    }
    if let Some(m) = &f.err {
        s.push_str(&format!(
            r#"<p class="error" id="flash-err">{}</p>"#,
            esc(m)
        ));
    }
    s
}

pub(super) fn back(to: &str, result: Result<String, String>) -> Response {
    let sep = if to.contains('?') { '&' } else { '?' };
    let q = match result {
        Ok(m) => format!("ok={}", url_enc(&m)),
        Err(m) => format!("err={}", url_enc(&m)),
    };
    Redirect::to(&format!("{to}{sep}{q}")).into_response()
}

fn health_badge(h: &str) -> String {
    let class = match h {
        "normal" | "warning" | "critical" => h,
        _ => "unknown",
    };
    format!(
        r#"<span class="health {class}" data-health="{}">{}</span>"#,
        esc(h),
        esc(&h.to_uppercase())
    )
}

pub(super) fn page(title: &str, user: &User, body: String) -> Html<String> {
    Html(layout(title, Some(&user.0), &body))
}

pub(super) fn host_row(s: &Shared, id: i64) -> Result<HostRow, String> {
    s.store
        .hosts()
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|h| h.id == id)
        .ok_or_else(|| format!("no host with id {id}"))
}

pub(super) fn vm_url(id: i64, vm: &str) -> String {
    format!("/hosts/{id}/vms/{}", url_enc(vm))
}

pub(super) fn api_vm(vm: &str, rest: &str) -> String {
    format!("/v1/vms/{}{rest}", url_enc(vm))
}

// ---- dashboard ----------------------------------------------------------------------------

/// One replication relationship, as both of its hosts report it.
struct Relationship<'a> {
    vm: String,
    primary: String,
    replica: String,
    primary_side: Option<(&'a HostView, &'a ReplicationHealthInfo)>,
    replica_side: Option<(&'a HostView, &'a ReplicationHealthInfo)>,
}

fn relationships<'a>(views: &[&'a HostView]) -> Vec<Relationship<'a>> {
    let mut map: BTreeMap<(String, String, String), Relationship<'a>> = BTreeMap::new();
    for v in views {
        for h in &v.health {
            let key = (
                h.vm.clone(),
                h.primary_server.clone(),
                h.replica_server.clone(),
            );
            let r = map.entry(key).or_insert_with(|| Relationship {
                vm: h.vm.clone(),
                primary: h.primary_server.clone(),
                replica: h.replica_server.clone(),
                primary_side: None,
                replica_side: None,
            });
            if h.role == "primary" {
                r.primary_side = Some((v, h));
            } else {
                r.replica_side = Some((v, h));
            }
        }
    }
    map.into_values().collect()
}

/// `GET /`: the fleet replication dashboard.
pub async fn dashboard(
    State(s): State<Shared>,
    Extension(user): Extension<User>,
    Query(f): Query<Flash>,
) -> Response {
    let fleet = s.poller.fleet.read().await;
    let views: Vec<&HostView> = fleet.hosts.values().collect();
    let rels = relationships(&views);
    let settings: AlertSettings = s
        .store
        .setting(SETTINGS_KEY)
        .ok()
        .flatten()
        .unwrap_or_default();
    let factor = settings.rules.rpo_factor.max(1) as i64;
    let active = s.store.alerts(0).map(|(a, _)| a.len()).unwrap_or(0);
    let reachable = views.iter().filter(|v| v.error.is_none()).count();
    let count = |h: &str| rels.iter().filter(|r| worst(r) == h).count();
    let mut body = flash(&f);
    body.push_str(&format!(
        r#"<p id="summary">Hosts: <b>{reachable}/{}</b> reachable · Relationships: {} <span class="health normal">{}</span> <span class="health warning">{}</span> <span class="health critical">{}</span> · <a href="/alerts">Active alerts: <b id="active-alerts">{active}</b></a></p>"#,
        views.len(),
        rels.len(),
        count("normal"),
        count("warning"),
        count("critical"),
    ));
    if rels.is_empty() {
        body.push_str("<p>No replication relationships yet. Add hosts, then enable replication on a VM's page.</p>");
    } else {
        body.push_str(r#"<table id="relationships"><tr><th>VM</th><th>Primary → Replica</th><th>State</th><th>Health</th><th>RPO now / target</th><th>Pending</th><th>Cycles ok / missed / errors</th><th>Last test failover</th></tr>"#);
        for r in &rels {
            let main = r.primary_side.or(r.replica_side).map(|(_, h)| h);
            let Some(h) = main else { continue };
            let interval = r
                .primary_side
                .or(r.replica_side)
                .and_then(|(v, _)| v.replication_of(&r.vm))
                .map(|i| i.interval_s as i64)
                .unwrap_or(0);
            let link = r
                .primary_side
                .or(r.replica_side)
                .map(|(v, _)| vm_url(v.row.id, &r.vm))
                .unwrap_or_default();
            let rpo = h.rpo_s.map(fmt_secs).unwrap_or_else(|| "-".into());
            let target = interval * factor;
            let over = h.rpo_s.is_some_and(|x| target > 0 && x > target);
            let test = r
                .replica_side
                .map(|(_, rh)| match rh.last_test_failover_at {
                    Some(t) => format!("{} ({})", fmt_time(t), esc(&rh.test_failover_status)),
                    None => format!("never ({})", esc(&rh.test_failover_status)),
                })
                .unwrap_or_else(|| "-".into());
            body.push_str(&format!(
                r#"<tr data-vm="{vm}"><td><a href="{link}?tab=replication">{vm}</a></td><td>{p} → {rp}</td><td>{state}</td><td class="rel-health">{health}</td><td class="{rpo_class}">{rpo} / {target}</td><td>{pending}</td><td>{ok} / {missed} / {errors}</td><td class="last-test">{test}</td></tr>"#,
                vm = esc(&r.vm),
                p = esc(&r.primary),
                rp = esc(&r.replica),
                state = esc(&h.state_label),
                health = health_badge(worst(r)),
                rpo_class = if over { "error" } else { "" },
                target = if target > 0 { fmt_secs(target) } else { "-".into() },
                pending = fmt_bytes(h.pending_bytes),
                ok = h.successful_cycles,
                missed = h.missed_cycles,
                errors = h.errors,
            ));
        }
        body.push_str("</table><h2>History</h2>");
        let since = crate::now() - 6 * 3600;
        for r in &rels {
            body.push_str(&format!("<h3>{}</h3>", esc(&r.vm)));
            body.push_str(&history_charts(
                &s,
                r.primary_side.map(|(v, _)| v.row.id),
                r.replica_side.map(|(v, _)| v.row.id),
                &r.vm,
                since,
            ));
        }
    }
    Html(super::refreshing(
        page("Replication dashboard", &user, body).0,
        LIST_REFRESH_S,
    ))
    .into_response()
}

fn worst(r: &Relationship<'_>) -> &'static str {
    let rank = |h: &str| match h {
        "critical" => 3,
        "warning" => 2,
        "normal" => 1,
        _ => 0,
    };
    let w = [r.primary_side, r.replica_side]
        .into_iter()
        .flatten()
        .map(|(_, h)| rank(&h.health))
        .max()
        .unwrap_or(0);
    ["unknown", "normal", "warning", "critical"][w]
}

/// Lag, cycle size, latency, traffic and pending size charts of one relationship, from the
/// console's stored history (samples from the primary side, cycles from the replica side).
fn history_charts(
    s: &Shared,
    primary: Option<i64>,
    replica: Option<i64>,
    vm: &str,
    since: i64,
) -> String {
    let samples = primary
        .or(replica)
        .and_then(|id| s.store.samples(id, vm, since).ok())
        .unwrap_or_default();
    let cycles = replica
        .and_then(|id| s.store.cycles(id, vm, since).ok())
        .unwrap_or_default();
    let lag: Vec<(i64, f64)> = samples
        .iter()
        .filter_map(|x| x.rpo_s.map(|r| (x.at, r as f64)))
        .collect();
    let pending: Vec<(i64, f64)> = samples
        .iter()
        .map(|x| (x.at, x.pending_bytes as f64))
        .collect();
    let traffic = rates(
        &samples
            .iter()
            .map(|x| (x.at, x.network_bytes))
            .collect::<Vec<_>>(),
    );
    let size: Vec<(i64, f64)> = cycles
        .iter()
        .filter(|c| c.cycle > 1)
        .map(|c| (c.taken_at, c.bytes as f64))
        .collect();
    let latency: Vec<(i64, f64)> = cycles
        .iter()
        .map(|c| (c.taken_at, (c.applied_at - c.taken_at).max(0) as f64))
        .collect();
    format!(
        r#"<div class="charts" data-vm="{}">{}{}{}{}{}</div>"#,
        esc(vm),
        line_chart("Lag (RPO)", Unit::Seconds, &lag, "#c62828"),
        line_chart("Cycle size", Unit::Bytes, &size, "#1565c0"),
        line_chart("Cycle latency", Unit::Seconds, &latency, "#6a1b9a"),
        line_chart("Traffic", Unit::BytesPerSecond, &traffic, "#2e7d32"),
        line_chart("Pending replication", Unit::Bytes, &pending, "#ef6c00"),
    )
}

// ---- hosts ------------------------------------------------------------------------------

/// `GET /hosts`.
pub async fn hosts(
    State(s): State<Shared>,
    Extension(user): Extension<User>,
    Query(f): Query<Flash>,
) -> Response {
    let fleet = s.poller.fleet.read().await;
    let rows = s.store.hosts().unwrap_or_default();
    let mut body = flash(&f);
    // The page holds the add-host form: only the status fragment reloads itself.
    body.push_str(&super::wizard::fleet_frame());
    body.push_str(r#"<table id="hosts"><tr><th>Host</th><th>URL</th><th>Fingerprint (pinned)</th><th>Status</th><th>Version</th><th>Accel</th><th>VMs</th><th>Cluster</th><th>Replica storage free</th><th></th></tr>"#);
    for h in &rows {
        let v = fleet.hosts.get(&h.id);
        let (status, version, accel, vms) = match v {
            None => (
                "<span class=\"health unknown\">NOT POLLED YET</span>".to_string(),
                String::new(),
                String::new(),
                String::new(),
            ),
            Some(v) => match (&v.error, &v.server) {
                (Some(e), _) => (
                    format!(
                        r#"<span class="health critical">UNREACHABLE</span> {}"#,
                        esc(e)
                    ),
                    String::new(),
                    String::new(),
                    String::new(),
                ),
                (None, Some(sv)) => (
                    "<span class=\"health normal\">REACHABLE</span>".to_string(),
                    esc(&sv.version),
                    esc(&sv.accel),
                    v.vms.len().to_string(),
                ),
                (None, None) => (String::new(), String::new(), String::new(), String::new()),
            },
        };
        let storage: Vec<String> = v
            .and_then(|v| v.replica_server.as_ref())
            .filter(|rs| rs.config.enabled)
            .map(|rs| {
                rs.storage
                    .iter()
                    .map(|st| {
                        format!(
                            "{}: {} of {}",
                            esc(&st.path),
                            fmt_bytes(st.free_bytes),
                            fmt_bytes(st.total_bytes)
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let storage = if storage.is_empty() {
            "-".to_string()
        } else {
            storage.join("<br>")
        };
        let cluster = match v.and_then(|v| v.last_cluster.as_ref()) {
            Some((_, name)) => format!(r#"<a href="/clusters">{}</a>"#, esc(name)),
            None => "-".into(),
        };
        body.push_str(&format!(
            r#"<tr data-host="{name}"><td>{name}</td><td>{url}</td><td><code>{fp}</code></td><td class="status">{status}</td><td>{version}</td><td>{accel}</td><td>{vms}</td><td class="cluster">{cluster}</td><td class="storage">{storage}</td><td><a href="/hosts/{id}/create-vm" class="create-vm">New VM…</a> <form method="post" action="/hosts/{id}/remove" class="inline"><button type="submit">Remove</button></form></td></tr>"#,
            name = esc(&h.name),
            url = esc(&h.url),
            fp = esc(&h.fingerprint),
            id = h.id,
        ));
    }
    body.push_str(r#"</table>
<form method="post" action="/hosts" id="add-host"><fieldset><legend>Add a host</legend>
<label>URL of its TLS API <input name="url" id="host-url" placeholder="https://10.0.0.2:7443" size="40" required></label>
<label>Certificate fingerprint (<code>ferry server show</code> on it) <input name="fingerprint" id="host-fingerprint" size="100" required></label>
<label>API token (its data dir's <code>api.token</code>) <input name="token" id="host-token" type="password" size="70" required></label>
<button type="submit" id="add-host-submit">Add host</button></fieldset></form>"#);
    page("Hosts", &user, body).into_response()
}

/// The add-host form.
#[derive(Deserialize)]
pub struct AddHostForm {
    url: String,
    fingerprint: String,
    token: String,
}

/// `POST /hosts`: checks the host answers with the pinned certificate and the token, then
/// stores it under the name it gives itself.
pub async fn add_host(State(s): State<Shared>, Form(f): Form<AddHostForm>) -> Response {
    let result = async {
        let url = f.url.trim().trim_end_matches('/').to_owned();
        let addr = url_addr(&url)?;
        let fp = normalize_fingerprint(&f.fingerprint);
        if fp.len() != 32 * 3 - 1 {
            return Err("fingerprint: paste the SHA-256 fingerprint `ferry server show` prints (32 bytes, AA:BB:…)".to_string());
        }
        let token = f.token.trim().to_owned();
        if token.is_empty() {
            return Err("token: paste the host's API token".into());
        }
        let c = Client::new(Endpoint::Tls { addr, fingerprint: fp.clone(), token: token.clone() });
        let info: ServerInfo = c
            .get("/v1/server")
            .await
            .map_err(|e| format!("{url}: {}", error_chain(&e)))?;
        match s.store.add_host(&info.name, &url, &fp, &token, crate::now()) {
            Ok(Some(_)) => Ok(format!("host {} added", info.name)),
            Ok(None) => Err(format!("a host named {} is already added", info.name)),
            Err(e) => Err(e.to_string()),
        }
    }
    .await;
    if result.is_ok() {
        s.poller.poll_soon();
    }
    back("/hosts", result)
}

/// `POST /hosts/{id}/remove`.
pub async fn remove_host(State(s): State<Shared>, Path(id): Path<i64>) -> Response {
    let r = match s.store.remove_host(id) {
        Ok(true) => Ok("host removed".to_string()),
        Ok(false) => Err(format!("no host with id {id}")),
        Err(e) => Err(e.to_string()),
    };
    s.poller.poll_soon();
    back("/hosts", r)
}

// ---- VMs --------------------------------------------------------------------------------

/// Seconds between reloads of the pages that hold no form (dashboard, VM list).
const LIST_REFRESH_S: u32 = 10;

/// `GET /vms`: every VM of every host.
pub async fn vms(
    State(s): State<Shared>,
    Extension(user): Extension<User>,
    Query(f): Query<Flash>,
) -> Response {
    let fleet = s.poller.fleet.read().await;
    let mut body = flash(&f);
    let new_vm: Vec<String> = fleet
        .hosts
        .values()
        .map(|v| {
            format!(
                r#"<a href="/hosts/{}/create-vm" class="create-vm">{}</a>"#,
                v.row.id,
                esc(&v.row.name)
            )
        })
        .collect();
    if !new_vm.is_empty() {
        body.push_str(&format!(
            "<p>New virtual machine on: {}</p>",
            new_vm.join(" · ")
        ));
    }
    body.push_str(r#"<table id="vms"><tr><th>Host</th><th>VM</th><th>State</th><th>CPUs</th><th>Memory</th><th>Replication</th><th>Replication state</th><th>Health</th><th>RPO</th><th>Screen</th></tr>"#);
    for v in fleet.hosts.values() {
        if let Some(e) = &v.error {
            body.push_str(&format!(
                r#"<tr><td>{}</td><td colspan="9" class="error">unreachable: {}</td></tr>"#,
                esc(&v.row.name),
                esc(e)
            ));
            continue;
        }
        for vm in &v.vms {
            let rep = v.replication_of(&vm.name);
            let h = v.health_of(&vm.name);
            body.push_str(&format!(
                r#"<tr data-host="{host}" data-vm="{name}"><td>{host}</td><td><a href="{link}">{name}</a></td><td class="vm-state">{state}</td><td>{cpus}</td><td>{mem} MiB</td><td>{role}</td><td>{rstate}</td><td class="vm-health">{health}</td><td>{rpo}</td><td>{screen}</td></tr>"#,
                host = esc(&v.row.name),
                name = esc(&vm.name),
                link = vm_url(v.row.id, &vm.name),
                state = esc(&vm.state.to_string()),
                cpus = vm.cpus,
                mem = vm.memory_mib,
                role = esc(rep.map(|r| r.role.as_str()).unwrap_or("-")),
                rstate = esc(rep.map(|r| r.state_label.as_str()).unwrap_or("-")),
                health = h.map(|h| health_badge(&h.health)).unwrap_or_else(|| "-".into()),
                rpo = h.and_then(|h| h.rpo_s).map(fmt_secs).unwrap_or_else(|| "-".into()),
                // The thumbnail is the host's screendump, fetched when the browser shows it.
                screen = if vm.vnc && vm.state.has_process() {
                    let link = vm_url(v.row.id, &vm.name);
                    format!(
                        r#"<a href="{link}/connect"><img class="thumb" src="{link}/screen.png" alt="screen of {name}" loading="lazy"></a>"#,
                        name = esc(&vm.name),
                    )
                } else {
                    "-".into()
                },
            ));
        }
    }
    body.push_str("</table>");
    Html(super::refreshing(
        page("Virtual machines", &user, body).0,
        LIST_REFRESH_S,
    ))
    .into_response()
}

// ---- clusters ----------------------------------------------------------------------------

/// A coloured badge with `label`, of the class `normal`, `warning`, `critical` or `unknown`.
fn badge(class: &str, label: &str) -> String {
    format!(r#"<span class="health {class}">{}</span>"#, esc(label))
}

fn node_badge(n: &ferry_api_types::cluster::ClusterNodeStatus) -> String {
    if n.unclean {
        badge("critical", "UNCLEAN (lost, not fenced yet)")
    } else if !n.online {
        badge("critical", "OFFLINE")
    } else if n.standby {
        badge("warning", "STANDBY")
    } else {
        badge("normal", "ONLINE")
    }
}

fn vm_state_badge(vm: &ferry_api_types::cluster::ClusterVmStatus) -> String {
    let class = match vm.state.as_str() {
        "started" => "normal",
        "migrating" => "warning",
        "failed" | "unplaced" => "critical",
        _ => "unknown",
    };
    badge(class, &vm.state)
}

/// What the Replica Broker column and section show: the Broker's name, address, state and
/// node, or that the cluster has none.
fn broker_cell(st: Option<&ferry_api_types::cluster::ClusterStatus>) -> String {
    match st.and_then(|s| s.broker.as_ref()) {
        Some(b) => format!(
            "{} at {} {} on {}{}",
            esc(&b.name),
            esc(&b.address),
            badge(
                if b.state == "started" {
                    "normal"
                } else {
                    "critical"
                },
                &b.state
            ),
            esc(b.node.as_deref().unwrap_or("-")),
            // Where the Broker placed each replica VM.
            if b.replicas.is_empty() {
                String::new()
            } else {
                format!(
                    "; replicas: {}",
                    b.replicas
                        .iter()
                        .map(|r| format!("{} on {}", esc(&r.vm), esc(&r.node)))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        ),
        None => "not configured".to_owned(),
    }
}

/// `GET /clusters`: every failover cluster the managed hosts are nodes of, each shown once
/// however many of its nodes are managed: quorum, designated controller, nodes, where each
/// VM runs, the fencing history, and the hosts that are not cluster nodes.
pub async fn clusters(
    State(s): State<Shared>,
    Extension(user): Extension<User>,
    Query(f): Query<Flash>,
) -> Response {
    let fleet = s.poller.fleet.read().await;
    let clusters = fleet.clusters();
    let mut body = flash(&f);
    if clusters.is_empty() {
        body.push_str(r#"<p id="no-clusters">None of the managed hosts is a failover cluster node (<code>ferry cluster create</code> / <code>ferry cluster join</code> on the hosts, then add them here).</p>"#);
    } else {
        body.push_str(r#"<table id="clusters"><tr><th>Cluster</th><th>Quorum</th><th>Designated controller</th><th>Nodes online</th><th>HA VMs running</th><th>Last fencing</th><th>Replica Broker</th></tr>"#);
        for (i, c) in clusters.iter().enumerate() {
            let (quorum, dc, online, ha) = match c.status {
                Some(st) if st.stack_error.is_none() => (
                    if st.quorate {
                        badge("normal", "QUORATE")
                    } else {
                        badge("critical", "NO QUORUM")
                    },
                    esc(st.dc.as_deref().unwrap_or("-")),
                    format!(
                        "{}/{}",
                        st.nodes.iter().filter(|n| n.online).count(),
                        st.nodes.len()
                    ),
                    format!(
                        "{}/{}",
                        st.vms
                            .iter()
                            .filter(|v| v.ha && v.state == "started")
                            .count(),
                        st.vms.iter().filter(|v| v.ha).count()
                    ),
                ),
                _ => (
                    badge("unknown", "UNKNOWN"),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ),
            };
            let last = c
                .fencing
                .iter()
                .rev()
                .find(|e| e.status == "success")
                .map(|e| {
                    format!(
                        "{} ({})",
                        esc(&e.target),
                        esc(e.completed.as_deref().unwrap_or("-"))
                    )
                })
                .unwrap_or_else(|| "-".into());
            body.push_str(&format!(
                r##"<tr data-cluster="{name}"><td><a href="#cluster-{i}">{name}</a></td><td class="quorum">{quorum}</td><td class="dc">{dc}</td><td class="nodes-online">{online}</td><td>{ha}</td><td class="last-fencing">{last}</td><td class="broker">{broker}</td></tr>"##,
                name = esc(&c.name),
                broker = broker_cell(c.status),
            ));
        }
        body.push_str("</table>");
    }
    for (i, c) in clusters.iter().enumerate() {
        body.push_str(&cluster_section(i, c));
    }
    let standalone: Vec<String> = fleet
        .hosts
        .values()
        .filter(|v| v.last_cluster.is_none())
        .map(|v| {
            let state = if v.error.is_some() {
                " (unreachable)"
            } else if v.polled_at == 0 {
                " (not polled yet)"
            } else {
                ""
            };
            format!("{}{state}", esc(&v.row.name))
        })
        .collect();
    body.push_str(&format!(
        r#"<h2>Hosts that are not cluster nodes</h2><p id="standalone">{}</p>"#,
        if standalone.is_empty() {
            "none".to_string()
        } else {
            standalone.join(", ")
        }
    ));
    Html(super::refreshing(
        page("Failover clusters", &user, body).0,
        LIST_REFRESH_S,
    ))
    .into_response()
}

/// One cluster's section of the clusters page.
fn cluster_section(i: usize, c: &crate::hosts::ClusterView<'_>) -> String {
    let mut b = format!(
        r#"<section class="cluster" id="cluster-{i}" data-cluster="{name}"><h2>Cluster {name}</h2>"#,
        name = esc(&c.name)
    );
    let answering: Vec<String> = c.answering.iter().map(|v| esc(&v.row.name)).collect();
    let silent: Vec<String> = c
        .silent
        .iter()
        .map(|v| {
            format!(
                "{} ({})",
                esc(&v.row.name),
                esc(v
                    .error
                    .as_deref()
                    .or(v.cluster_error.as_deref())
                    .unwrap_or("not polled yet"))
            )
        })
        .collect();
    let Some(st) = c.status else {
        b.push_str(&format!(
            r#"<p class="error cluster-silent">No node of this cluster answers: {}</p></section>"#,
            silent.join(", ")
        ));
        return b;
    };
    b.push_str(&format!(
        r#"<p class="cluster-info">Shared storage <code>{dir}</code> · shown as <b class="seen-from">{this}</b> sees it · managed nodes answering: {ans}{sil}</p>"#,
        dir = esc(&st.shared_dir),
        this = esc(&st.this_node),
        ans = if answering.is_empty() { "none".into() } else { answering.join(", ") },
        // The errors of configured nodes are in the nodes' table.
        sil = if c.silent.is_empty() {
            String::new()
        } else {
            let names: Vec<String> = c
                .silent
                .iter()
                .zip(&silent)
                .map(|(v, with_error)| {
                    if st.nodes.iter().any(|n| n.name == v.row.name) {
                        esc(&v.row.name)
                    } else {
                        with_error.clone()
                    }
                })
                .collect();
            format!(
                r#" · <span class="error">not answering: {}</span>"#,
                names.join(", ")
            )
        },
    ));
    if let Some(e) = &st.stack_error {
        b.push_str(&format!(
            r#"<p class="error stack-error">The cluster stack does not answer on {}: {} (only the configuration is shown)</p>"#,
            esc(&st.this_node),
            esc(e)
        ));
    }
    b.push_str(&format!(
        r#"<p>Quorum: <span class="quorum">{}</span> · designated controller: <b class="dc">{}</b></p>"#,
        if st.stack_error.is_some() {
            badge("unknown", "UNKNOWN")
        } else if st.quorate {
            badge("normal", "QUORATE")
        } else {
            badge("critical", "NO QUORUM")
        },
        esc(st.dc.as_deref().unwrap_or("-"))
    ));
    b.push_str(r#"<h3>Nodes</h3><table class="cluster-nodes"><tr><th>Node</th><th>Address</th><th>State</th><th>Role</th><th>Console host</th></tr>"#);
    for n in &st.nodes {
        let host = match c.host_of(&n.name) {
            None => "not added to this console".to_string(),
            Some(v) => match &v.error {
                Some(e) => format!(r#"<span class="error">unreachable</span>: {}"#, esc(e)),
                None => "reachable".into(),
            },
        };
        b.push_str(&format!(
            r#"<tr data-node="{name}"><td>{name}</td><td>{addr}</td><td class="node-state">{state}</td><td class="node-role">{role}</td><td class="node-host">{host}</td></tr>"#,
            name = esc(&n.name),
            addr = esc(&n.address),
            state = node_badge(n),
            role = if n.dc { "designated controller" } else { "" },
        ));
    }
    b.push_str("</table>");
    b.push_str(r#"<h3>Virtual machines</h3><table class="cluster-vms"><tr><th>VM</th><th>Highly available</th><th>Owner node</th><th>State</th></tr>"#);
    if st.vms.is_empty() {
        b.push_str(r#"<tr><td colspan="4">no VM on the shared storage</td></tr>"#);
    }
    for vm in &st.vms {
        // The VM's page on the node that runs it, when the console manages that node.
        let name = match vm
            .node
            .as_deref()
            .and_then(|n| c.host_of(n))
            .filter(|h| h.error.is_none())
        {
            Some(h) => format!(
                r#"<a href="{}">{}</a>"#,
                vm_url(h.row.id, &vm.name),
                esc(&vm.name)
            ),
            None => esc(&vm.name),
        };
        b.push_str(&format!(
            r#"<tr data-vm="{vm}"><td>{name}</td><td class="vm-ha">{ha}</td><td class="vm-node">{node}</td><td class="vm-state">{state}</td></tr>"#,
            vm = esc(&vm.name),
            ha = if vm.ha { "yes" } else { "no" },
            node = esc(vm.node.as_deref().unwrap_or("-")),
            state = vm_state_badge(vm),
        ));
    }
    b.push_str("</table>");
    b.push_str(r#"<h3>Fencing history</h3><table class="cluster-fencing"><tr><th>Completed (UTC)</th><th>Node fenced</th><th>Action</th><th>Result</th><th>Fenced by</th></tr>"#);
    if c.fencing.is_empty() {
        b.push_str(r#"<tr><td colspan="5">no fencing</td></tr>"#);
    }
    for e in c.fencing.iter().rev() {
        b.push_str(&format!(
            r#"<tr data-target="{target}"><td>{at}</td><td class="fence-target">{target}</td><td>{action}</td><td class="fence-status">{status}</td><td>{by}</td></tr>"#,
            at = esc(e.completed.as_deref().unwrap_or("-")),
            target = esc(&e.target),
            action = esc(&e.action),
            status = if e.status == "success" {
                badge("normal", "success")
            } else {
                badge("critical", &e.status)
            },
            by = esc(e.delegate.as_deref().unwrap_or("-")),
        ));
    }
    b.push_str("</table>");
    b.push_str(&format!(
        r#"<h3>Replica Broker</h3><p class="broker">{}</p></section>"#,
        broker_cell(c.status)
    ));
    b
}

/// `GET /hosts/{id}/vms/{vm}`: overview or (`?tab=replication`) the replication tab.
pub async fn vm_page(
    State(s): State<Shared>,
    Extension(user): Extension<User>,
    Path((id, vm)): Path<(i64, String)>,
    Query(f): Query<Flash>,
) -> Response {
    let row = match host_row(&s, id) {
        Ok(r) => r,
        Err(e) => return back("/vms", Err(e)),
    };
    let c = client(&row);
    let info: VmInfo = match c.get(&api_vm(&vm, "")).await {
        Ok(i) => i,
        Err(e) => {
            return back(
                "/vms",
                Err(format!("{} on {}: {}", vm, row.name, error_chain(&e))),
            )
        }
    };
    let rep: Option<ReplicationInfo> = c.get(&api_vm(&vm, "/replication")).await.ok();
    let tab = f.tab.as_deref().unwrap_or("overview");
    let url = vm_url(id, &vm);
    let mut body = flash(&f);
    body.push_str(&format!(
        r#"<p>Host <b>{}</b> · state <b id="vm-state">{}</b></p><p class="tabs"><a href="{url}?tab=overview" id="tab-overview">Overview</a><a href="{url}?tab=replication" id="tab-replication">Replication</a><a href="{url}?tab=checkpoints" id="tab-checkpoints">Checkpoints</a>{connect}</p>"#,
        esc(&row.name),
        esc(&info.state.to_string()),
        connect = if info.vnc && info.state.has_process() {
            format!(r#"<a href="{url}/connect" id="connect">Connect</a>"#)
        } else {
            String::new()
        },
    ));
    body.push_str(&super::wizard::status_frame(id, &vm));
    if tab == "replication" {
        body.push_str(&replication_tab(&s, &c, id, &row, &info, rep.as_ref()).await);
    } else if tab == "checkpoints" {
        body.push_str(&checkpoints_tab(&c, id, &vm).await);
    } else {
        body.push_str(&overview_tab(id, &info, rep.as_ref()));
        let events: Vec<EventInfo> = c
            .get(&format!("/v1/events?vm={}&limit=10000", url_enc(&vm)))
            .await
            .unwrap_or_default();
        body.push_str("<h2>Recent events</h2><table id=\"events\"><tr><th>Time (UTC)</th><th>Code</th><th>Severity</th><th>Message</th></tr>");
        for e in events.iter().rev().take(15) {
            body.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                fmt_time(e.at_ms / 1000),
                e.code,
                esc(&e.severity),
                esc(&e.message)
            ));
        }
        body.push_str("</table>");
    }
    page(&format!("VM {vm}"), &user, body).into_response()
}

/// A form for one action. A destructive action's form GETs its confirmation page (which
/// says what will be lost and POSTs the action); the others POST at once.
fn action_button(id: i64, vm: &str, action: &str, label: &str, extra: &str) -> String {
    let (method, to) = if super::wizard::destructive(action) {
        ("get", "confirm")
    } else {
        ("post", "action")
    };
    format!(
        r#"<form method="{method}" action="{}/{to}" class="inline"><input type="hidden" name="action" value="{action}">{extra}<button type="submit" id="action-{action}">{label}</button></form>"#,
        vm_url(id, vm)
    )
}

fn overview_tab(id: i64, vm: &VmInfo, rep: Option<&ReplicationInfo>) -> String {
    let mut s = String::from("<table id=\"vm-info\">");
    let disks: Vec<String> = vm
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| format!("{i}: {} ({})", esc(&d.path), fmt_bytes(d.size_bytes)))
        .collect();
    for (k, v) in [
        ("CPUs", vm.cpus.to_string()),
        ("Memory", format!("{} MiB", vm.memory_mib)),
        ("Disks", disks.join("<br>")),
        (
            "NICs",
            vm.nics
                .iter()
                .map(|n| {
                    esc(&format!(
                        "{} {} {}",
                        n.kind,
                        n.bridge.as_deref().unwrap_or(""),
                        n.mac
                    ))
                })
                .collect::<Vec<_>>()
                .join("<br>"),
        ),
        ("Boot", esc(&vm.boot)),
        (
            "Uptime",
            vm.uptime_s
                .map(|u| fmt_secs(u as i64))
                .unwrap_or_else(|| "-".into()),
        ),
        (
            "Replication",
            esc(rep
                .map(|r| format!("{} ({})", r.role, r.state_label))
                .as_deref()
                .unwrap_or("not enabled")),
        ),
        ("Last error", esc(vm.last_error.as_deref().unwrap_or("-"))),
    ] {
        s.push_str(&format!("<tr><th>{k}</th><td>{v}</td></tr>"));
    }
    s.push_str("</table><fieldset><legend>Actions</legend>");
    s.push_str(&action_button(id, &vm.name, "start", "Start", ""));
    s.push_str(&action_button(id, &vm.name, "shutdown", "Shut down", ""));
    s.push_str(&action_button(id, &vm.name, "stop", "Turn off", ""));
    s.push_str(&action_button(id, &vm.name, "delete", "Delete VM…", ""));
    if rep.is_none() {
        s.push_str(&format!(
            r#" <a href="{}/enable-replication" id="enable-replication">Enable replication…</a>"#,
            vm_url(id, &vm.name)
        ));
    }
    s.push_str("</fieldset>");
    s
}

fn point_select(points: &[RecoveryPointInfo]) -> String {
    let mut s = String::from(r#"<select name="point"><option value="latest">latest</option>"#);
    for p in points.iter().rev() {
        s.push_str(&format!(
            r#"<option value="{}">#{} cycle {} {} ({})</option>"#,
            p.id,
            p.id,
            p.cycle,
            fmt_time(p.taken_at),
            esc(&p.consistency)
        ));
    }
    s.push_str("</select>");
    s
}

async fn replication_tab(
    s: &Shared,
    c: &Client,
    id: i64,
    row: &HostRow,
    vm: &VmInfo,
    rep: Option<&ReplicationInfo>,
) -> String {
    let Some(rep) = rep else {
        return format!(
            r#"<p id="replication-state">Replication is not enabled for this VM. <a href="{}/enable-replication" id="enable-replication">Enable replication…</a></p>"#,
            vm_url(id, &vm.name)
        );
    };
    let h: Option<ReplicationHealthInfo> =
        c.get(&api_vm(&vm.name, "/replication/health")).await.ok();
    let points: Vec<RecoveryPointInfo> = if rep.role == "replica" {
        c.get(&api_vm(&vm.name, "/replication/points"))
            .await
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut out = String::new();
    out.push_str(&format!(
        r#"<table id="replication"><tr><th>Replication state</th><td id="replication-state">{}</td></tr><tr><th>Role</th><td>{}</td></tr><tr><th>Partner</th><td>{} ({})</td></tr><tr><th>Interval</th><td>{}</td></tr><tr><th>Additional recovery points</th><td>{}</td></tr><tr><th>Last cycle</th><td>{}</td></tr><tr><th>Progress</th><td>{}</td></tr><tr><th>Last error</th><td>{}</td></tr></table>"#,
        esc(&rep.state_label),
        esc(&rep.role),
        esc(&rep.partner),
        esc(&rep.partner_addr),
        fmt_secs(rep.interval_s as i64),
        rep.recovery_points,
        rep.last_cycle,
        rep.progress.as_ref().map(|p| format!("{} {}%", esc(&p.phase), p.percent)).unwrap_or_else(|| "-".into()),
        esc(rep.last_error.as_deref().unwrap_or("-")),
    ));
    if let Some(h) = &h {
        out.push_str(&format!(
            r#"<h2>Health {}</h2><ul id="health-details">{}</ul><table id="statistics">"#,
            health_badge(&h.health),
            h.details
                .iter()
                .map(|d| format!("<li>{}</li>", esc(d)))
                .collect::<String>()
        ));
        for (k, v) in [
            (
                "From / to",
                format!("{} – {}", fmt_time(h.from_time), fmt_time(h.to_time)),
            ),
            (
                "Average / maximum size",
                format!(
                    "{} / {}",
                    fmt_bytes(h.average_size),
                    fmt_bytes(h.maximum_size)
                ),
            ),
            (
                "Average / maximum latency",
                format!("{} ms / {} ms", h.average_latency_ms, h.maximum_latency_ms),
            ),
            (
                "Successful / expected / missed cycles",
                format!(
                    "{} / {} / {}",
                    h.successful_cycles, h.expected_cycles, h.missed_cycles
                ),
            ),
            ("Errors", h.errors.to_string()),
            ("Pending replication size", fmt_bytes(h.pending_bytes)),
            (
                "Last synchronized at",
                h.last_synchronized_at
                    .map(fmt_time)
                    .unwrap_or_else(|| "-".into()),
            ),
            (
                "RPO now",
                h.rpo_s.map(fmt_secs).unwrap_or_else(|| "-".into()),
            ),
            ("Network bytes", fmt_bytes(h.network_bytes)),
            ("Test failover", esc(&h.test_failover_status)),
            (
                "Last test failover",
                h.last_test_failover_at
                    .map(fmt_time)
                    .unwrap_or_else(|| "never".into()),
            ),
        ] {
            let idattr = if k == "Test failover" {
                r#" id="test-failover-status""#
            } else {
                ""
            };
            out.push_str(&format!("<tr><th>{k}</th><td{idattr}>{v}</td></tr>"));
        }
        out.push_str("</table>");
    }
    out.push_str("<fieldset><legend>Replication actions</legend>");
    let name = &vm.name;
    if rep.role == "primary" {
        out.push_str(&action_button(id, name, "cycle", "Replicate now", ""));
        out.push_str(&action_button(id, name, "suspend", "Suspend", ""));
        out.push_str(&action_button(id, name, "resume", "Resume", ""));
        out.push_str(&action_button(id, name, "resync", "Resume with resync", ""));
        out.push_str(&action_button(
            id,
            name,
            "start_initial",
            "Start initial replication",
            "",
        ));
        out.push_str(&action_button(
            id,
            name,
            "planned",
            "Planned failover",
            r#"<label class="inline"><input type="checkbox" name="start"> start on replica</label><label class="inline"><input type="checkbox" name="reverse"> reverse</label>"#,
        ));
        out.push_str(&action_button(id, name, "cancel", "Cancel failover", ""));
    } else {
        let ps = point_select(&points);
        out.push_str(&action_button(
            id,
            name,
            "test_failover",
            "Test failover",
            &format!(r#"{ps}<label class="inline">test network <input name="network" size="10" placeholder="none" title="a bridge of the replica host for the test VM's NICs; empty: no NICs"></label>"#),
        ));
        out.push_str(&action_button(
            id,
            name,
            "stop_test",
            "Stop test failover",
            "",
        ));
        out.push_str(&action_button(
            id,
            name,
            "failover",
            "Failover",
            &format!(r#"{ps}<label class="inline"><input type="checkbox" name="start"> start</label><label class="inline"><input type="checkbox" name="force"> force</label>"#),
        ));
        out.push_str(&action_button(id, name, "cancel", "Cancel failover", ""));
        out.push_str(&action_button(
            id,
            name,
            "complete",
            "Complete failover",
            "",
        ));
        // The end of an initial replication exported to a folder (external media).
        out.push_str(&action_button(
            id,
            name,
            "import",
            "Import initial copy",
            r#"<input name="dir" id="import-dir" placeholder="folder on this replica server" size="30">"#,
        ));
        let others: String = s
            .store
            .hosts()
            .unwrap_or_default()
            .into_iter()
            .filter(|h| h.id != row.id)
            .map(|h| format!(r#"<option value="{}">{}</option>"#, h.id, esc(&h.name)))
            .collect();
        out.push_str(&action_button(
            id,
            name,
            "reverse",
            "Reverse replication",
            &format!(r#"<select name="to">{others}</select><label class="inline"><input type="checkbox" name="resync"> resync</label>"#),
        ));
        out.push_str(&action_button(id, name, "suspend", "Suspend", ""));
        out.push_str(&action_button(id, name, "resume", "Resume", ""));
    }
    out.push_str(&action_button(id, name, "reset", "Reset statistics", ""));
    out.push_str(&action_button(
        id,
        name,
        "remove",
        "Remove replication (this side)",
        "",
    ));
    out.push_str("</fieldset>");
    if !points.is_empty() {
        out.push_str(r#"<h2>Recovery points</h2><table id="points"><tr><th>ID</th><th>Cycle</th><th>Kind</th><th>Consistency</th><th>Taken at (UTC)</th><th>Applied at</th><th>Bytes</th></tr>"#);
        for p in points.iter().rev() {
            out.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                p.id,
                p.cycle,
                esc(&p.kind),
                esc(&p.consistency),
                fmt_time(p.taken_at),
                fmt_time(p.applied_at),
                fmt_bytes(p.bytes.max(0) as u64)
            ));
        }
        out.push_str("</table>");
    }
    // History: this side's samples; cycles from whichever side is the replica.
    let fleet = s.poller.fleet.read().await;
    let partner = fleet
        .hosts
        .values()
        .find(|v| v.server.as_ref().is_some_and(|sv| sv.name == rep.partner))
        .map(|v| v.row.id);
    let (p, r) = if rep.role == "primary" {
        (Some(id), partner)
    } else {
        (partner.or(Some(id)), Some(id))
    };
    out.push_str("<h2>History (6 h)</h2>");
    out.push_str(&history_charts(s, p, r, name, crate::now() - 6 * 3600));
    out
}

/// The checkpoint tree (each checkpoint under its parent, "Now" under the current one) and
/// its actions: create, apply, rename, delete (optionally with its subtree).
async fn checkpoints_tab(c: &Client, id: i64, vm: &str) -> String {
    let list: CheckpointList = match c.get(&api_vm(vm, "/checkpoints")).await {
        Ok(l) => l,
        Err(e) => {
            return format!(
                r#"<p class="error" id="checkpoints-error">{}</p>"#,
                esc(&error_chain(&e))
            )
        }
    };
    let mut out = String::from(
        r#"<table id="checkpoints"><tr><th>Checkpoint</th><th>Kind</th><th>Consistency</th><th>Taken (UTC)</th><th>Actions</th></tr>"#,
    );
    walk_checkpoints(&list, None, 0, id, vm, &mut out);
    out.push_str("</table><fieldset><legend>New checkpoint</legend>");
    out.push_str(&action_button(
        id,
        vm,
        "cp_create",
        "Create checkpoint",
        r#"<input name="name" id="checkpoint-name" placeholder="name (default: VM and time)"><select name="kind" id="checkpoint-kind"><option>production</option><option>standard</option></select>"#,
    ));
    out.push_str("</fieldset>");
    out
}

/// Rows of the checkpoints below `parent`, depth first, so children sit under their parent.
fn walk_checkpoints(
    list: &CheckpointList,
    parent: Option<i64>,
    depth: usize,
    id: i64,
    vm: &str,
    out: &mut String,
) {
    for cp in list.checkpoints.iter().filter(|c| c.parent_id == parent) {
        out.push_str(&checkpoint_row(cp, depth, id, vm));
        if list.current == Some(cp.id) {
            out.push_str(&format!(
                r#"<tr><td style="padding-left:{}px" id="checkpoint-now"><i>Now</i></td><td colspan="4"></td></tr>"#,
                26 + depth * 18
            ));
        }
        walk_checkpoints(list, Some(cp.id), depth + 1, id, vm, out);
    }
}

fn checkpoint_row(cp: &CheckpointInfo, depth: usize, id: i64, vm: &str) -> String {
    let hidden = format!(
        r#"<input type="hidden" name="checkpoint" value="{}">"#,
        cp.id
    );
    let form = |action: &str, label: &str, extra: &str| {
        action_button(id, vm, action, label, &format!("{hidden}{extra}"))
    };
    format!(
        r#"<tr data-checkpoint="{name}"><td style="padding-left:{pad}px">{name}</td><td>{kind}</td><td>{cons}</td><td>{at}</td><td>{apply}{rename}{delete}</td></tr>"#,
        name = esc(&cp.name),
        pad = 8 + depth * 18,
        kind = esc(&cp.kind),
        cons = esc(&cp.consistency),
        at = fmt_time(cp.created_ms / 1000),
        apply = form(
            "cp_apply",
            "Apply",
            r#"<label class="inline"><input type="checkbox" name="checkpoint_first"> checkpoint first</label>"#
        ),
        rename = form("cp_rename", "Rename", r#"<input name="name" size="16">"#),
        delete = form(
            "cp_delete",
            "Delete",
            r#"<label class="inline"><input type="checkbox" name="subtree"> with subtree</label>"#
        ),
    )
}

/// `POST /hosts/{id}/vms/{vm}/action`: one action, sent to the VM's host.
pub async fn vm_action(
    State(s): State<Shared>,
    Path((id, vm)): Path<(i64, String)>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let action = f.get("action").map(String::as_str).unwrap_or("");
    // Nothing destructive happens without its confirmation page's button.
    if super::wizard::destructive(action) && f.get("confirmed").map(String::as_str) != Some("yes") {
        return super::wizard::to_confirmation(id, &vm, &f);
    }
    let tab = if matches!(action, "start" | "shutdown" | "stop" | "delete") {
        "overview"
    } else if action.starts_with("cp_") {
        "checkpoints"
    } else {
        "replication"
    };
    let to = format!("{}?tab={tab}", vm_url(id, &vm));
    let row = match host_row(&s, id) {
        Ok(r) => r,
        Err(e) => return back("/vms", Err(e)),
    };
    let r = run_action(&s, &row, &vm, action, &f).await;
    s.poller.poll_soon();
    // A deleted VM has no page left to go back to.
    if action == "delete" && r.is_ok() {
        return back("/vms", r);
    }
    back(&to, r)
}

fn checked(f: &HashMap<String, String>, k: &str) -> bool {
    f.get(k).is_some_and(|v| v == "on" || v == "true")
}

fn point_of(f: &HashMap<String, String>) -> Result<Option<i64>, String> {
    match f.get("point").map(String::as_str) {
        None | Some("") | Some("latest") => Ok(None),
        Some(p) => p
            .parse()
            .map(Some)
            .map_err(|_| format!("recovery point {p:?}: not a point id")),
    }
}

async fn run_action(
    s: &Shared,
    row: &HostRow,
    vm: &str,
    action: &str,
    f: &HashMap<String, String>,
) -> Result<String, String> {
    let c = client(row);
    let e = |e: ferry_client::ClientError| error_chain(&e);
    let reply = |r: ActionReply| r.message;
    let info = |i: ReplicationInfo| format!("replication of {}: {}", i.vm, i.state_label);
    match action {
        "start" | "stop" => c.post(&api_vm(vm, &format!("/{action}")), &()).await.map(reply).map_err(e),
        "delete" => c.delete(&api_vm(vm, "")).await.map(reply).map_err(e),
        "shutdown" => c
            .post(&api_vm(vm, "/shutdown"), &ShutdownRequest::default())
            .await
            .map(reply)
            .map_err(e),
        "suspend" | "resume" | "resync" | "cycle" => c
            .post(&api_vm(vm, &format!("/replication/{action}")), &())
            .await
            .map(info)
            .map_err(e),
        "start_initial" => c.post(&api_vm(vm, "/replication/start"), &()).await.map(info).map_err(e),
        "reset" => c
            .post::<_, ReplicationHealthInfo>(&api_vm(vm, "/replication/health/reset"), &())
            .await
            .map(|_| "statistics reset: a new monitoring window started".to_string())
            .map_err(e),
        "remove" => c.delete(&api_vm(vm, "/replication")).await.map(reply).map_err(e),
        "test_failover" => {
            let point = point_of(f)?;
            let network = f.get("network").map(|n| n.trim()).filter(|n| !n.is_empty());
            c.post(&api_vm(vm, "/replication/test-failover"), &serde_json::json!({ "point": point, "network": network }))
                .await
                .map(reply)
                .map_err(e)
        }
        "stop_test" => c.delete(&api_vm(vm, "/replication/test-failover")).await.map(reply).map_err(e),
        "failover" => {
            let point = point_of(f)?;
            c.post(
                &api_vm(vm, "/failover"),
                &serde_json::json!({ "point": point, "start": checked(f, "start"), "force": checked(f, "force") }),
            )
            .await
            .map(reply)
            .map_err(e)
        }
        "planned" => c
            .post(
                &api_vm(vm, "/failover/planned"),
                &serde_json::json!({ "start": checked(f, "start"), "reverse": checked(f, "reverse") }),
            )
            .await
            .map(reply)
            .map_err(e),
        "import" => {
            let dir = f
                .get("dir")
                .map(|d| d.trim())
                .filter(|d| !d.is_empty())
                .ok_or("import: give the folder holding the exported initial copy")?;
            c.post(&api_vm(vm, "/replication/import"), &serde_json::json!({ "dir": dir }))
                .await
                .map(info)
                .map_err(e)
        }
        "cancel" => c.post(&api_vm(vm, "/failover/cancel"), &()).await.map(reply).map_err(e),
        "complete" => c.post(&api_vm(vm, "/failover/complete"), &()).await.map(reply).map_err(e),
        "reverse" => {
            let to: i64 = f
                .get("to")
                .and_then(|t| t.parse().ok())
                .ok_or("reverse: choose the host to replicate back to")?;
            let target = host_row(s, to)?;
            let (name, addr, fp) = resolve_replica(&target).await?;
            c.post(
                &api_vm(vm, "/replication/reverse"),
                &serde_json::json!({
                    "replica_name": name, "replica_addr": addr, "replica_fingerprint": fp,
                    "resync": checked(f, "resync"),
                }),
            )
            .await
            .map(info)
            .map_err(e)
        }
        "cp_create" => {
            let kind = match f.get("kind").map(String::as_str).unwrap_or("production") {
                k @ ("production" | "standard") => k,
                k => return Err(format!("checkpoint kind {k:?}: use production or standard")),
            };
            let name = f.get("name").map(|n| n.trim()).filter(|n| !n.is_empty());
            c.post::<_, CheckpointCreated>(
                &api_vm(vm, "/checkpoints"),
                &serde_json::json!({ "name": name, "kind": kind }),
            )
            .await
            .map(|r| r.message)
            .map_err(e)
        }
        "cp_apply" | "cp_rename" | "cp_delete" => {
            let cp: i64 = f
                .get("checkpoint")
                .and_then(|c| c.parse().ok())
                .ok_or("choose a checkpoint")?;
            let path = api_vm(vm, &format!("/checkpoints/{cp}"));
            match action {
                "cp_apply" => c
                    .post(
                        &format!("{path}/apply"),
                        &serde_json::json!({ "checkpoint_first": checked(f, "checkpoint_first") }),
                    )
                    .await
                    .map(reply)
                    .map_err(e),
                "cp_rename" => {
                    let name = f.get("name").map(|n| n.trim()).unwrap_or("");
                    if name.is_empty() {
                        return Err("rename: give the new name".into());
                    }
                    c.post::<_, CheckpointInfo>(
                        &format!("{path}/rename"),
                        &serde_json::json!({ "name": name }),
                    )
                    .await
                    .map(|i| format!("checkpoint renamed to {}", i.name))
                    .map_err(e)
                }
                _ => {
                    let q = if checked(f, "subtree") { "?subtree=true" } else { "" };
                    c.delete(&format!("{path}{q}")).await.map(reply).map_err(e)
                }
            }
        }
        other => Err(format!("unknown action {other:?}")),
    }
}

/// The replica server's name, replication address and fingerprint, read from the host
/// itself (as `ferry replication enable --to HOST` does).
async fn resolve_replica(target: &HostRow) -> Result<(String, String, String), String> {
    let info: ReplicaServerInfo = client(target)
        .get("/v1/replica-server")
        .await
        .map_err(|e| {
            format!(
                "cannot ask {} for its replica-server settings: {}",
                target.name,
                error_chain(&e)
            )
        })?;
    if !info.config.enabled {
        return Err(format!(
            "{} is not a replica server: enable it there (ferry replica-server set --enable …)",
            target.name
        ));
    }
    let host = url_addr(&target.url)?
        .rsplit_once(':')
        .map(|(h, _)| h.to_owned())
        .unwrap_or_default();
    Ok((
        info.name,
        format!("{host}:{}", info.config.port),
        info.fingerprint,
    ))
}

// ---- enable replication wizard -------------------------------------------------------------

/// `GET …/enable-replication`: the wizard, with the CLI's choices.
pub async fn enable_wizard(
    State(s): State<Shared>,
    Extension(user): Extension<User>,
    Path((id, vm)): Path<(i64, String)>,
    Query(f): Query<Flash>,
) -> Response {
    let row = match host_row(&s, id) {
        Ok(r) => r,
        Err(e) => return back("/vms", Err(e)),
    };
    let info: VmInfo = match client(&row).get(&api_vm(&vm, "")).await {
        Ok(i) => i,
        Err(e) => return back("/vms", Err(error_chain(&e))),
    };
    let hosts: String = s
        .store
        .hosts()
        .unwrap_or_default()
        .into_iter()
        .filter(|h| h.id != id)
        .map(|h| format!(r#"<option value="{}">{}</option>"#, h.id, esc(&h.name)))
        .collect();
    let disks: String = info
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            format!(
                r#"<label class="inline"><input type="checkbox" name="exclude_{i}"> disk {i} ({})</label>"#,
                esc(&d.path)
            )
        })
        .collect();
    let body = format!(
        r#"{flash}<form method="post" id="enable-form"><fieldset><legend>1. Replica server</legend>
<label>Host <select name="to" id="replica-host"><option value="">(address below)</option>{hosts}</select></label>
<label>or ADDRESS:PORT of its replication port <input name="replica_addr"> with fingerprint <input name="replica_fingerprint" size="60"></label></fieldset>
<fieldset><legend>2. Frequency and recovery points</legend>
<label>Interval <input name="interval" id="interval" value="5m"> (30s, 5m, 15m, or any duration from 1s)</label>
<label>Additional recovery points <input name="recovery_points" type="number" min="0" max="96" value="0"></label>
<label>Point spacing <input name="point_spacing" value="1h"></label>
<label>Application-consistent every <input name="app_consistent_every" placeholder="e.g. 4h (empty: crash-consistent only)"></label></fieldset>
<fieldset><legend>3. What to send and how</legend>
<label><input type="checkbox" name="compression" checked> compress (zstd)</label>
<div>Exclude: {disks}</div>
<label>Bandwidth limit <input name="bandwidth_limit" placeholder="e.g. 10M (bytes/s; empty: none)"></label>
<label>Tracking granularity <input name="granularity" value="4K"></label></fieldset>
<fieldset><legend>4. Initial replication</legend>
<label><input type="radio" name="initial" value="network" checked> over the network now</label>
<label><input type="radio" name="initial" value="at"> at UNIX time <input name="initial_at" size="12"></label>
<label><input type="radio" name="initial" value="export"> export to folder on this host <input name="initial_dir" size="40"></label>
<label><input type="radio" name="initial" value="existing"> from a copy already on the replica server</label></fieldset>
<button type="submit" id="enable-submit">Enable replication</button></form>"#,
        flash = flash(&f),
    );
    page(
        &format!("Enable replication of {vm} on {}", row.name),
        &user,
        body,
    )
    .into_response()
}

/// `POST …/enable-replication`.
pub async fn enable_replication(
    State(s): State<Shared>,
    Path((id, vm)): Path<(i64, String)>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let wizard = format!("{}/enable-replication", vm_url(id, &vm));
    let req = match enable_request(&s, &f).await {
        Ok(r) => r,
        Err(e) => return back(&wizard, Err(e)),
    };
    let row = match host_row(&s, id) {
        Ok(r) => r,
        Err(e) => return back("/vms", Err(e)),
    };
    match client(&row)
        .post::<_, ReplicationInfo>(&api_vm(&vm, "/replication"), &req)
        .await
    {
        Ok(i) => {
            s.poller.poll_soon();
            back(
                &format!("{}?tab=replication", vm_url(id, &vm)),
                Ok(format!(
                    "replication of {vm} to {} enabled: {}",
                    req.replica_name, i.state_label
                )),
            )
        }
        Err(e) => back(&wizard, Err(error_chain(&e))),
    }
}

async fn enable_request(
    s: &Shared,
    f: &HashMap<String, String>,
) -> Result<EnableReplicationRequest, String> {
    let field = |k: &str| f.get(k).map(|v| v.trim()).unwrap_or("");
    let (replica_name, replica_addr, replica_fingerprint) = match field("to") {
        "" => {
            let addr = field("replica_addr");
            let fp = field("replica_fingerprint");
            if addr.is_empty() || fp.is_empty() || !addr.contains(':') {
                return Err(
                    "replica server: choose a host, or give ADDRESS:PORT and its fingerprint"
                        .into(),
                );
            }
            let name = addr
                .rsplit_once(':')
                .map(|(h, _)| h)
                .unwrap_or(addr)
                .to_owned();
            (name, addr.to_owned(), normalize_fingerprint(fp))
        }
        to => {
            let to: i64 = to
                .parse()
                .map_err(|_| "replica server: not a host".to_string())?;
            resolve_replica(&host_row(s, to)?).await?
        }
    };
    let recovery_points: u32 = match field("recovery_points") {
        "" => 0,
        v => v
            .parse()
            .map_err(|_| format!("additional recovery points {v:?}: a number 0-96"))?,
    };
    let size = |k: &str, what: &str| -> Result<Option<u64>, String> {
        match field(k) {
            "" => Ok(None),
            v => ferry_api_types::parse_size(v)
                .map(Some)
                .map_err(|e| format!("{what} {v:?}: {e}")),
        }
    };
    let granularity = size("granularity", "granularity")?
        .map(|g| u32::try_from(g).map_err(|_| "granularity: too large".to_string()))
        .transpose()?;
    let initial = match field("initial") {
        "" | "network" => "network".to_owned(),
        "at" => {
            let t: i64 = field("initial_at")
                .parse()
                .map_err(|_| "initial replication at: give a UNIX time".to_string())?;
            format!("at:{t}")
        }
        "export" => {
            let d = field("initial_dir");
            if !d.starts_with('/') {
                return Err(
                    "initial replication export: give an absolute folder on the primary".into(),
                );
            }
            format!("export:{d}")
        }
        "existing" => "existing".into(),
        other => return Err(format!("initial replication {other:?}: not a choice")),
    };
    let mut exclude_disks: Vec<usize> = f
        .keys()
        .filter_map(|k| k.strip_prefix("exclude_"))
        .filter_map(|i| i.parse().ok())
        .collect();
    exclude_disks.sort_unstable();
    let interval = match field("interval") {
        "" => "5m".to_owned(),
        v => v.to_owned(),
    };
    Ok(EnableReplicationRequest {
        replica_name,
        replica_addr,
        replica_fingerprint,
        interval,
        recovery_points,
        point_spacing: Some(match field("point_spacing") {
            "" => "1h".to_owned(),
            v => v.to_owned(),
        }),
        compression: checked(f, "compression"),
        exclude_disks,
        initial: Some(initial),
        bandwidth_limit: size("bandwidth_limit", "bandwidth limit")?,
        granularity,
        app_consistent_every: Some(field("app_consistent_every").to_owned())
            .filter(|v| !v.is_empty()),
    })
}

// ---- alerts -----------------------------------------------------------------------------

/// `GET /alerts`: active and past alerts with their deliveries, and the settings.
pub async fn alerts(
    State(s): State<Shared>,
    Extension(user): Extension<User>,
    Query(f): Query<Flash>,
) -> Response {
    let (active, past) = s.store.alerts(100).unwrap_or_default();
    let settings: AlertSettings = s
        .store
        .setting(SETTINGS_KEY)
        .ok()
        .flatten()
        .unwrap_or_default();
    let mut body = flash(&f);
    // The page holds the settings form: only the status fragment reloads itself.
    body.push_str(&super::wizard::fleet_frame());
    let table = |rows: &[crate::store::AlertRow], id: &str| {
        let mut t = format!(
            r#"<table id="{id}"><tr><th>#</th><th>Rule</th><th>Host</th><th>VM</th><th>Message</th><th>Started (UTC)</th><th>Cleared</th><th>Notified</th></tr>"#
        );
        for a in rows {
            let notes: Vec<String> = s
                .store
                .deliveries(a.id)
                .unwrap_or_default()
                .into_iter()
                .map(|d| {
                    format!(
                        "{} {} {}",
                        d.transition,
                        d.channel,
                        if d.ok {
                            "ok".to_string()
                        } else {
                            format!("FAILED: {}", d.error.unwrap_or_default())
                        }
                    )
                })
                .collect();
            t.push_str(&format!(
                r#"<tr data-rule="{rule}"><td>{}</td><td>{rule}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
                a.id,
                esc(&a.host),
                esc(a.vm.as_deref().unwrap_or("-")),
                esc(&a.message),
                fmt_time(a.started_at),
                a.cleared_at.map(fmt_time).unwrap_or_else(|| "active".into()),
                esc(&notes.join("; ")),
                rule = esc(&a.rule),
            ));
        }
        t.push_str("</table>");
        t
    };
    body.push_str(&format!("<h2>Active ({})</h2>", active.len()));
    body.push_str(&table(&active, "active-alerts"));
    body.push_str("<h2>Past</h2>");
    body.push_str(&table(&past, "past-alerts"));
    let r = &settings.rules;
    let c = &settings.channels;
    let sel = |v: &str, cur: &str| if v == cur { " selected" } else { "" };
    let chk = |b: bool| if b { " checked" } else { "" };
    body.push_str(&format!(
        r#"<form method="post" action="/alerts/settings" id="alert-settings"><fieldset><legend>Rules</legend>
<label>Replication health at or above <select name="health_min"><option{w}>warning</option><option{cr}>critical</option><option{off}>off</option></select></label>
<label>RPO over <input name="rpo_factor" type="number" min="0" value="{rpo}"> × the interval (0: off)</label>
<label><input type="checkbox" name="resync_required"{rs}> resynchronization required</label>
<label>Initial replication not finished after <input name="initial_not_finished_min" type="number" min="0" value="{ini}"> min (0: off)</label>
<label>Failover not reversed after <input name="failover_not_reversed_min" type="number" min="0" value="{fo}"> min (0: off)</label>
<label><input type="checkbox" name="host_unreachable"{hu}> host unreachable</label>
<label>No test failover in <input name="test_failover_max_age_days" type="number" min="0" value="{tf}"> days (0: off)</label>
<label>Replica storage under <input name="storage_free_min_percent" type="number" min="0" max="100" value="{sf}"> % free (0: off)</label>
<label><input type="checkbox" name="cluster_quorum"{cq}> a failover cluster has no quorum</label>
<label><input type="checkbox" name="node_fenced"{nf}> a cluster node was fenced (once per fencing; clears when the node is back)</label>
<label><input type="checkbox" name="ha_vm_unplaced"{hv}> a highly available VM cannot be placed or has failed</label>
<label>A condition alerts after holding, and clears after being gone, for <input name="debounce_s" type="number" min="0" value="{db}"> s</label></fieldset>
<fieldset><legend>E-mail (SMTP)</legend>
<label>Server <input name="smtp_host" value="{sh}"> port <input name="smtp_port" type="number" value="{sp}"></label>
<label>Security <select name="smtp_security"><option{st}>starttls</option><option{tl}>tls</option><option{no}>none</option></select></label>
<label>User <input name="smtp_username" value="{su}"> password <input name="smtp_password" type="password" placeholder="{pw}"></label>
<label>Extra CA (PEM file on this machine) <input name="smtp_ca_file" value="{ca}" size="50"></label>
<label>From <input name="mail_from" value="{from}"> to <input name="mail_to" value="{to}" size="50"> (comma-separated)</label></fieldset>
<fieldset><legend>Webhook</legend><label>POST JSON to <input name="webhook_url" value="{wh}" size="60"></label>
<label>This console's URL (for links in mails) <input name="console_url" value="{cu}" size="40"></label></fieldset>
<button type="submit" id="save-alert-settings">Save</button></form>
<form method="post" action="/alerts/test"><button type="submit" id="test-alert">Send a test notification</button></form>"#,
        w = sel("warning", &r.health_min),
        cr = sel("critical", &r.health_min),
        off = sel("off", &r.health_min),
        rpo = r.rpo_factor,
        rs = chk(r.resync_required),
        ini = r.initial_not_finished_min,
        fo = r.failover_not_reversed_min,
        hu = chk(r.host_unreachable),
        tf = r.test_failover_max_age_days,
        sf = r.storage_free_min_percent,
        cq = chk(r.cluster_quorum),
        nf = chk(r.node_fenced),
        hv = chk(r.ha_vm_unplaced),
        db = r.debounce_s,
        sh = esc(&c.smtp_host),
        sp = c.smtp_port,
        st = sel("starttls", &c.smtp_security),
        tl = sel("tls", &c.smtp_security),
        no = sel("none", &c.smtp_security),
        su = esc(&c.smtp_username),
        pw = if c.smtp_password.is_empty() { "" } else { "(stored; empty keeps it)" },
        ca = esc(&c.smtp_ca_file),
        from = esc(&c.mail_from),
        to = esc(&c.mail_to.join(", ")),
        wh = esc(&c.webhook_url),
        cu = esc(&settings.console_url),
    ));
    page("Alerts", &user, body).into_response()
}

/// `POST /alerts/settings`: validated as a whole; a bad value changes nothing.
pub async fn save_alert_settings(
    State(s): State<Shared>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let result = (|| {
        let old: AlertSettings = s
            .store
            .setting(SETTINGS_KEY)
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        let field = |k: &str| f.get(k).map(|v| v.trim().to_owned()).unwrap_or_default();
        let num = |k: &str, what: &str| -> Result<u32, String> {
            let v = field(k);
            if v.is_empty() {
                return Ok(0);
            }
            v.parse()
                .map_err(|_| format!("{what} {v:?}: not a whole number"))
        };
        let mut new = AlertSettings {
            rules: crate::alerts::rules::RuleSettings {
                health_min: field("health_min"),
                rpo_factor: num("rpo_factor", "RPO factor")?,
                resync_required: checked(&f, "resync_required"),
                initial_not_finished_min: num(
                    "initial_not_finished_min",
                    "initial replication minutes",
                )?,
                failover_not_reversed_min: num("failover_not_reversed_min", "failover minutes")?,
                host_unreachable: checked(&f, "host_unreachable"),
                test_failover_max_age_days: num(
                    "test_failover_max_age_days",
                    "test failover days",
                )?,
                storage_free_min_percent: num("storage_free_min_percent", "free space percent")?,
                cluster_quorum: checked(&f, "cluster_quorum"),
                node_fenced: checked(&f, "node_fenced"),
                ha_vm_unplaced: checked(&f, "ha_vm_unplaced"),
                debounce_s: num("debounce_s", "debounce")?,
            },
            channels: delivery::ChannelSettings {
                smtp_host: field("smtp_host"),
                smtp_port: {
                    let v = field("smtp_port");
                    if v.is_empty() {
                        587
                    } else {
                        v.parse()
                            .map_err(|_| format!("SMTP port {v:?}: use 1 to 65535"))?
                    }
                },
                smtp_security: field("smtp_security"),
                smtp_username: field("smtp_username"),
                smtp_password: f.get("smtp_password").cloned().unwrap_or_default(),
                smtp_ca_file: field("smtp_ca_file"),
                mail_from: field("mail_from"),
                mail_to: field("mail_to")
                    .split(',')
                    .map(str::trim)
                    .filter(|x| !x.is_empty())
                    .map(str::to_owned)
                    .collect(),
                webhook_url: field("webhook_url"),
            },
            console_url: field("console_url").trim_end_matches('/').to_owned(),
        };
        if new.channels.smtp_password.is_empty() {
            new.channels.smtp_password = old.channels.smtp_password;
        }
        new.rules.validate()?;
        new.channels.validate(&s.webhook_allow)?;
        s.store
            .set_setting(SETTINGS_KEY, &new)
            .map_err(|e| e.to_string())?;
        Ok("alert settings saved".to_string())
    })();
    back("/alerts", result)
}

/// `POST /alerts/test`: a test notification on every channel, to check the settings.
pub async fn test_alert(State(s): State<Shared>) -> Response {
    let settings: AlertSettings = s
        .store
        .setting(SETTINGS_KEY)
        .ok()
        .flatten()
        .unwrap_or_default();
    let t = crate::alerts::rules::Transition {
        kind: crate::alerts::rules::TransitionKind::Start,
        condition: crate::alerts::rules::Condition {
            key: "test".into(),
            rule: "test",
            host: "ferry-console".into(),
            hosts: vec![],
            vm: None,
            message: "This is a test notification from the Ferry console.".into(),
            hold_s: 0,
        },
        at: crate::now(),
    };
    let outcomes = delivery::deliver(
        &settings.channels,
        &t,
        0,
        &settings.console_url,
        &s.webhook_allow,
    )
    .await;
    if outcomes.is_empty() {
        return back("/alerts", Err("no channel is configured".into()));
    }
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.error.as_ref().map(|e| format!("{}: {e}", o.channel)))
        .collect();
    if failed.is_empty() {
        back(
            "/alerts",
            Ok(format!(
                "test notification sent ({})",
                outcomes
                    .iter()
                    .map(|o| o.channel)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        )
    } else {
        back("/alerts", Err(failed.join("; ")))
    }
}

#[cfg(test)]
mod broker_tests {
    use super::broker_cell;
    use ferry_api_types::cluster::{BrokerStatus, ClusterStatus};

    #[test]
    fn the_broker_cell_shows_the_broker_or_that_there_is_none() {
        let mut st = ClusterStatus {
            name: "rb".into(),
            shared_dir: "/srv/c".into(),
            this_node: "node4".into(),
            quorate: true,
            dc: None,
            nodes: vec![],
            vms: vec![],
            fencing: vec![],
            stack_error: None,
            replication_fingerprint: None,
            broker: None,
        };
        assert_eq!(broker_cell(Some(&st)), "not configured");
        assert_eq!(broker_cell(None), "not configured");
        st.broker = Some(BrokerStatus {
            name: "rb-broker".into(),
            address: "10.0.0.100".into(),
            api: "10.0.0.100:7445".into(),
            fingerprint: "AB".into(),
            token_file: "/srv/c/broker/data/api.token".into(),
            admin_socket: "/run/ferry/broker.sock".into(),
            node: Some("node5".into()),
            state: "started".into(),
            replicas: vec![ferry_api_types::cluster::BrokerReplica {
                vm: "app".into(),
                node: "node6".into(),
                last_cycle: 4,
            }],
        });
        let cell = broker_cell(Some(&st));
        assert!(cell.contains("app on node6"), "{cell}");
        assert!(
            cell.contains("rb-broker") && cell.contains("10.0.0.100"),
            "{cell}"
        );
        assert!(cell.contains("started") && cell.contains("node5"), "{cell}");
    }
}
