//! `ferry replica-server …` and `ferry replication …`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use ferry_api_types::{
    ActionReply, AuthorizationEntry, EnableReplicationRequest, EventInfo, ImportRequest,
    RecoveryPointInfo, ReplicaServerInfo, ReplicaServerSetRequest, ReplicationHealthInfo,
    ReplicationInfo,
};
use ferry_client::{Client, Endpoint};

use crate::output::Output;
use crate::progress::ProgressView;
use crate::{hosts, vm_path, Format};

#[derive(Subcommand)]
pub enum ReplicaServerCmd {
    /// Whether this host accepts replication, on which port, from whom, stored where.
    Show,
    /// Configure the replica-server role (Hyper-V's Replication Configuration).
    Set {
        /// Accept replication.
        #[arg(long, conflicts_with = "disable")]
        enable: bool,
        /// Stop accepting replication.
        #[arg(long)]
        disable: bool,
        /// Port for host-to-host replication (mutual TLS); default 7444.
        #[arg(long)]
        port: Option<u16>,
        /// Accept any primary whose host certificate the CA given with --trust-ca issued
        /// (never a self-signed one); needs --storage.
        #[arg(long, conflicts_with_all = ["allow", "deny_any"])]
        allow_any: bool,
        /// The CA certificate(s), PEM, that --allow-any trusts; `none` removes it.
        #[arg(long, value_name = "FILE")]
        trust_ca: Option<PathBuf>,
        /// Whether a primary may start a VM on this host (planned failover with --start):
        /// `yes` or `no` (the default: the VM fails over and stays off for this host's admin).
        #[arg(long, value_name = "yes|no", value_parser = parse_yes_no)]
        allow_primary_start: Option<bool>,
        /// Network mapping at failover: the primary's bridge (for one primary:
        /// PRIMARY/BRIDGE) joins this host's LOCAL_BRIDGE; unmapped bridged NICs are left out.
        #[arg(long, value_name = "[PRIMARY/]BRIDGE=LOCAL_BRIDGE")]
        map_bridge: Option<String>,
        /// Remove the network mapping of [PRIMARY/]BRIDGE.
        #[arg(long, value_name = "[PRIMARY/]BRIDGE")]
        unmap_bridge: Option<String>,
        /// Most replica VMs one primary may have here (0: no limit).
        #[arg(long, value_name = "N")]
        max_vms_per_primary: Option<u32>,
        /// Most virtual disk space the replicas of one storage location may take, e.g.
        /// `2T` (0: no limit).
        #[arg(long, value_name = "SIZE")]
        storage_quota: Option<String>,
        /// Stop accepting primaries that are not listed.
        #[arg(long)]
        deny_any: bool,
        /// Allow one primary: NAME=FINGERPRINT (`ferry server show` on it); needs --storage.
        #[arg(long)]
        allow: Option<String>,
        /// Trust group of the primary given with --allow.
        #[arg(long, requires = "allow")]
        trust_group: Option<String>,
        /// Where replicas go (of any primary with --allow-any, or of the --allow one).
        #[arg(long)]
        storage: Option<PathBuf>,
        /// Remove the authorization entry of this primary.
        #[arg(long)]
        disallow: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum ReplicationCmd {
    /// Replicate a VM to a replica server.
    Enable {
        /// The VM (on this host, which becomes its primary server).
        vm: String,
        /// The replica server: a name from `ferry host list`, or its admin socket path,
        /// or ADDR:PORT of its replication port with --replica-fingerprint.
        #[arg(long)]
        to: String,
        /// The replica server's certificate fingerprint, when --to is ADDR:PORT.
        #[arg(long)]
        replica_fingerprint: Option<String>,
        /// Time between cycles: 30s, 5m, 15m (Hyper-V's), or any duration from 1s.
        #[arg(long, default_value = "5m")]
        interval: String,
        /// Additional recovery points to keep besides the latest (Hyper-V: 0-24).
        #[arg(long, default_value_t = 0)]
        recovery_points: u32,
        /// Minimum spacing of the additional points (Hyper-V: hourly).
        #[arg(long, default_value = "1h")]
        point_spacing: String,
        /// Send uncompressed (compression is on by default).
        #[arg(long)]
        no_compression: bool,
        /// Do not replicate this disk (index from `ferry vm show`). Repeatable.
        #[arg(long)]
        exclude_disk: Vec<usize>,
        /// Initial replication: `network` (now), `at:UNIX_TIME` (scheduled, up to 7 days),
        /// `export:DIR` (written to DIR/VM on this host, carried over, then `ferry replication
        /// import` on the replica server),
        /// or `existing` (the replica server already holds a qcow2 copy of each disk at
        /// STORAGE/VM/diskN.qcow2, e.g. restored from a backup: only differences are sent).
        #[arg(long, default_value = "network")]
        initial: String,
        /// Bandwidth limit for this VM's replication, e.g. 10M (bytes/s).
        #[arg(long)]
        bandwidth_limit: Option<String>,
        /// Change-tracking granularity, 4K to 1M (4K ships exactly what 4K writes changed).
        #[arg(long, default_value = "4K")]
        granularity: String,
        /// Make a recovery point application-consistent (guest filesystems frozen through
        /// qemu-guest-agent, when the guest runs it) at most this often, e.g. 4h.
        #[arg(long)]
        app_consistent_every: Option<String>,
        /// Wait for the initial replication to finish, showing progress.
        #[arg(long)]
        wait: bool,
    },
    /// On the replica server: apply an initial copy exported on the primary with
    /// `--initial export:DIR` and carried here (the folder DIR/VM).
    Import {
        /// The replica VM.
        vm: String,
        /// The folder holding export.json and initial.ferry.
        dir: PathBuf,
    },
    /// Start a scheduled initial replication now.
    Start {
        /// The VM.
        vm: String,
    },
    /// Run a replication cycle now (instead of waiting for the interval).
    Now {
        /// The VM.
        vm: String,
    },
    /// A VM's replication state, settings and progress.
    Status {
        /// The VM.
        vm: String,
        /// Keep showing progress until the current cycle ends.
        #[arg(long)]
        watch: bool,
    },
    /// Every replicated VM on this host.
    List,
    /// Replication health and statistics over the monitoring window (Hyper-V's "View
    /// Replication Health"): of one VM, or of every VM on this host.
    Health {
        /// The VM (all when omitted).
        vm: Option<String>,
        /// Also save the figures as CSV (one row per VM) to this file.
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Reset the statistics first: a new monitoring window starts.
        #[arg(long, requires = "vm")]
        reset: bool,
    },
    /// The recovery points of a replica VM (on the replica server).
    Points {
        /// The VM.
        vm: String,
    },
    /// On a failed-over replica: replicate back to the old primary (delta only: what the VM
    /// wrote since the failover).
    Reverse {
        /// The VM.
        vm: String,
        /// The old primary: a name from `ferry host list`, its admin socket path, or
        /// ADDR:PORT of its replication port with --replica-fingerprint.
        #[arg(long)]
        to: String,
        /// Its certificate fingerprint, when --to is ADDR:PORT.
        #[arg(long)]
        replica_fingerprint: Option<String>,
        /// After an unplanned failover: compare both sides (the old primary may hold writes
        /// the failover point lacks) and send only the differences.
        #[arg(long)]
        resync: bool,
    },
    /// On the old primary of a VM failed over without a planned failover: agree that it
    /// becomes the replica of the failed-over copy (its disk is then overwritten by
    /// reverse replication), for the next hour. `replication reverse --to` does this itself
    /// when it reaches this host's admin API.
    AcceptReverse {
        /// The VM.
        vm: String,
    },
    /// Pause replication (changes are still tracked).
    Suspend {
        /// The VM.
        vm: String,
    },
    /// Resume replication.
    Resume {
        /// The VM.
        vm: String,
        /// Compare both sides and send the differences (after "resynchronization required").
        #[arg(long)]
        resync: bool,
    },
    /// Remove replication on this side (the other side keeps its part until removed there).
    Remove {
        /// The VM.
        vm: String,
    },
}

pub async fn replica_server(
    client: &Client,
    cmd: ReplicaServerCmd,
    out: &Output,
) -> anyhow::Result<()> {
    let info: ReplicaServerInfo = match cmd {
        ReplicaServerCmd::Show => client.get("/v1/replica-server").await?,
        ReplicaServerCmd::Set {
            enable,
            disable,
            port,
            allow_any,
            trust_ca,
            allow_primary_start,
            map_bridge,
            unmap_bridge,
            max_vms_per_primary,
            storage_quota,
            deny_any,
            allow,
            trust_group,
            storage,
            disallow,
        } => {
            let storage = storage.map(crate::absolute).transpose()?;
            let trusted_ca = match trust_ca {
                None => None,
                Some(p) if p.as_os_str() == "none" => Some(String::new()),
                Some(p) => Some(
                    std::fs::read_to_string(&p)
                        .with_context(|| format!("cannot read --trust-ca {}", p.display()))?,
                ),
            };
            let allow = match allow {
                None => None,
                Some(a) => {
                    let Some((name, fp)) = a.split_once('=') else {
                        bail!("--allow {a}: use NAME=FINGERPRINT");
                    };
                    Some(AuthorizationEntry {
                        primary: name.to_owned(),
                        fingerprint: fp.to_owned(),
                        storage: storage.clone().unwrap_or_default(),
                        trust_group: trust_group.unwrap_or_default(),
                    })
                }
            };
            let req = ReplicaServerSetRequest {
                enabled: if enable {
                    Some(true)
                } else if disable {
                    Some(false)
                } else {
                    None
                },
                port,
                allow_any: if allow_any {
                    Some(true)
                } else if deny_any {
                    Some(false)
                } else {
                    None
                },
                trusted_ca,
                allow_primary_start,
                map_bridge: match map_bridge {
                    None => None,
                    Some(m) => {
                        let Some((from, to)) = m.split_once('=') else {
                            bail!("--map-bridge {m}: use [PRIMARY/]BRIDGE=LOCAL_BRIDGE");
                        };
                        Some((from.to_owned(), to.to_owned()))
                    }
                },
                unmap_bridge,
                max_vms_per_primary,
                storage_quota_bytes: match storage_quota {
                    None => None,
                    Some(q) if q == "0" => Some(0),
                    Some(q) => Some(
                        ferry_domain::parse_size(&q)
                            .map_err(|e| anyhow::anyhow!("--storage-quota {q}: {e}"))?,
                    ),
                },
                storage,
                allow,
                disallow,
            };
            client.post("/v1/replica-server", &req).await?
        }
    };
    if out.json(&info) {
        return Ok(());
    }
    let c = &info.config;
    println!(
        "Replica server: {}",
        if c.enabled { "enabled" } else { "disabled" }
    );
    println!("Name:           {}", info.name);
    println!("Fingerprint:    {}", info.fingerprint);
    println!("Port:           {}", c.port);
    println!(
        "Listening:      {}",
        info.listening.as_deref().unwrap_or("-")
    );
    if c.allow_any && c.trusted_ca.is_some() {
        println!(
            "Authorization:  any primary with a certificate from the trusted CA -> {}",
            c.default_storage.as_deref().unwrap_or("-")
        );
    } else if c.allow_any {
        println!(
            "Authorization:  listed primaries only (--allow-any is set but trusts no CA: `ferry replica-server set --trust-ca CA.pem`)"
        );
    } else {
        println!("Authorization:  listed primaries only");
    }
    for e in &c.entries {
        println!(
            "  allow {} ({}) -> {} [trust group {}]",
            e.primary, e.fingerprint, e.storage, e.trust_group
        );
    }
    if let Some(n) = c.max_vms_per_primary {
        println!("Limit:          {n} replica VMs per primary");
    }
    if let Some(q) = c.storage_quota_bytes {
        println!("Quota:          {q} bytes of virtual disk per storage location");
    }
    for (from, to) in &c.bridge_map {
        println!("  network {from} -> {to}");
    }
    println!(
        "Primary start:  {}",
        if c.allow_primary_start {
            "a planned failover from a primary may start its VM here"
        } else {
            "no (failed-over VMs are started by this host's admin)"
        }
    );
    Ok(())
}

fn parse_yes_no(v: &str) -> Result<bool, String> {
    match v {
        "yes" | "true" | "on" => Ok(true),
        "no" | "false" | "off" => Ok(false),
        _ => Err(format!("{v:?}: use yes or no")),
    }
}

/// Where the replica server is and who it is, from the name given to --to.
/// The admin API of `to` when it names one (an admin socket, or a host from `ferry host
/// list`), `None` for ADDR:PORT.
fn admin_endpoint(to: &str) -> anyhow::Result<Option<Endpoint>> {
    Ok(if to.starts_with('/') {
        Some(Endpoint::Unix(PathBuf::from(to)))
    } else {
        hosts::load()?.endpoint(to).ok()
    })
}

async fn resolve_replica(
    to: &str,
    fingerprint: Option<String>,
) -> anyhow::Result<(String, String, String)> {
    match admin_endpoint(to)? {
        Some(ep) => {
            let url_host = match &ep {
                Endpoint::Tls { addr, .. } => addr.rsplit_once(':').map(|(h, _)| h.to_owned()),
                Endpoint::Unix(_) => None,
            };
            let info: ReplicaServerInfo = Client::new(ep)
                .get("/v1/replica-server")
                .await
                .with_context(|| format!("cannot ask {to} for its replica-server settings"))?;
            if !info.config.enabled {
                bail!("{to} is not a replica server: on it, run `ferry replica-server set --enable --allow-any --storage DIR` (or --allow)");
            }
            let addr = match (url_host, &info.listening) {
                (Some(h), _) => format!("{h}:{}", info.config.port),
                (None, Some(l)) => l.clone(),
                (None, None) => bail!("{to} is enabled as a replica server but not listening"),
            };
            Ok((info.name, addr, info.fingerprint))
        }
        None => {
            let Some(fp) = fingerprint else {
                bail!("--to {to}: not a known host; give a name from `ferry host list`, or ADDR:PORT with --replica-fingerprint");
            };
            if !to.contains(':') {
                bail!("--to {to}: not a known host and not ADDR:PORT");
            }
            Ok((
                to.rsplit_once(':').map(|(h, _)| h).unwrap_or(to).to_owned(),
                to.to_owned(),
                fp,
            ))
        }
    }
}

pub async fn replication(client: &Client, cmd: ReplicationCmd, out: &Output) -> anyhow::Result<()> {
    match cmd {
        ReplicationCmd::Enable {
            vm,
            to,
            replica_fingerprint,
            interval,
            recovery_points,
            point_spacing,
            no_compression,
            exclude_disk,
            initial,
            bandwidth_limit,
            granularity,
            app_consistent_every,
            wait,
        } => {
            let bandwidth_limit = bandwidth_limit
                .map(|b| {
                    ferry_api_types::parse_size(&b)
                        .map_err(|e| anyhow::anyhow!("--bandwidth-limit {b}: {e}"))
                })
                .transpose()?;
            let granularity = ferry_api_types::parse_size(&granularity)
                .map_err(|e| anyhow::anyhow!("--granularity {granularity}: {e}"))?;
            let (replica_name, replica_addr, fp) =
                resolve_replica(&to, replica_fingerprint).await?;
            let req = EnableReplicationRequest {
                replica_name,
                replica_addr,
                replica_fingerprint: fp,
                interval,
                recovery_points,
                point_spacing: Some(point_spacing),
                compression: !no_compression,
                exclude_disks: exclude_disk,
                initial: Some(initial),
                bandwidth_limit,
                granularity: Some(u32::try_from(granularity).unwrap_or(u32::MAX)),
                app_consistent_every,
            };
            let export = req
                .initial
                .as_deref()
                .is_some_and(|i| i.starts_with("export:"));
            let info: ReplicationInfo = client.post(&vm_path(&vm, "/replication"), &req).await?;
            if wait {
                // An export is done once written (the import completes it on the replica).
                let info = watch(client, &vm, out, |i| {
                    i.last_cycle >= 1 || (export && i.state == "waiting_for_initial_replication")
                })
                .await?;
                return show(out, &info);
            }
            show(out, &info)
        }
        ReplicationCmd::Start { vm } => show(
            out,
            &client
                .post(&vm_path(&vm, "/replication/start"), &())
                .await?,
        ),
        ReplicationCmd::Now { vm } => {
            let before: ReplicationInfo = client
                .post(&vm_path(&vm, "/replication/cycle"), &())
                .await?;
            let info = watch(client, &vm, out, |i| {
                i.last_cycle > before.last_cycle || i.last_error.is_some()
            })
            .await?;
            show(out, &info)
        }
        ReplicationCmd::Status { vm, watch: w } => {
            let info: ReplicationInfo = client.get(&vm_path(&vm, "/replication")).await?;
            if w {
                let cycle = info.last_cycle;
                let info = watch(client, &vm, out, |i| {
                    i.progress.is_none() && (i.last_cycle > cycle || i.last_error.is_some())
                })
                .await?;
                return show(out, &info);
            }
            show(out, &info)
        }
        ReplicationCmd::List => {
            let all: Vec<ReplicationInfo> = client.get("/v1/replication").await?;
            if out.json(&all) {
                return Ok(());
            }
            if all.is_empty() {
                println!(
                    "No replicated VMs. Enable one with `ferry replication enable VM --to HOST`."
                );
                return Ok(());
            }
            println!(
                "{:<20} {:<8} {:<34} {:<16} {:>8} {:>6} {:>20}",
                "VM", "ROLE", "STATE", "PARTNER", "INTERVAL", "CYCLE", "LAST POINT"
            );
            for i in &all {
                println!(
                    "{:<20} {:<8} {:<34} {:<16} {:>8} {:>6} {:>20}",
                    i.vm,
                    i.role,
                    i.state,
                    i.partner,
                    format!("{}s", i.interval_s),
                    i.last_cycle,
                    i.last_point_at.map(time).unwrap_or_else(|| "-".into())
                );
            }
            Ok(())
        }
        ReplicationCmd::Points { vm } => {
            let points: Vec<RecoveryPointInfo> =
                client.get(&vm_path(&vm, "/replication/points")).await?;
            if out.json(&points) {
                return Ok(());
            }
            if points.is_empty() {
                println!("No recovery points yet: the initial replication has not finished.");
                return Ok(());
            }
            println!(
                "{:>6} {:>6} {:<8} {:<12} {:>20} {:>12}",
                "ID", "CYCLE", "KIND", "CONSISTENCY", "TAKEN AT (UTC)", "BYTES"
            );
            for p in &points {
                println!(
                    "{:>6} {:>6} {:<8} {:<12} {:>20} {:>12}",
                    p.id,
                    p.cycle,
                    p.kind,
                    p.consistency,
                    time(p.taken_at),
                    p.bytes
                );
            }
            Ok(())
        }
        ReplicationCmd::AcceptReverse { vm } => show(
            out,
            &client
                .post(&vm_path(&vm, "/replication/accept-reverse"), &())
                .await?,
        ),
        ReplicationCmd::Suspend { vm } => show(
            out,
            &client
                .post(&vm_path(&vm, "/replication/suspend"), &())
                .await?,
        ),
        ReplicationCmd::Resume { vm, resync } => {
            let what = if resync { "resync" } else { "resume" };
            show(
                out,
                &client
                    .post(&vm_path(&vm, &format!("/replication/{what}")), &())
                    .await?,
            )
        }
        ReplicationCmd::Import { vm, dir } => {
            let dir = std::path::absolute(&dir)
                .with_context(|| format!("{}: not a usable path", dir.display()))?;
            let req = ImportRequest {
                dir: dir.display().to_string(),
            };
            let path = vm_path(&vm, "/replication/import");
            let import = client.post::<_, ReplicationInfo>(&path, &req);
            tokio::pin!(import);
            let mut view = ProgressView::new(out);
            let info = loop {
                tokio::select! {
                    r = &mut import => break r?,
                    _ = tokio::time::sleep(Duration::from_millis(250)), if view.active() => {
                        let i: ReplicationInfo = client.get(&vm_path(&vm, "/replication")).await?;
                        if let Some(p) = &i.progress {
                            view.update(p);
                        }
                    }
                }
            };
            view.finish();
            show(out, &info)
        }
        ReplicationCmd::Health { vm, csv, reset } => {
            let list: Vec<ReplicationHealthInfo> = match &vm {
                Some(vm) if reset => {
                    vec![
                        client
                            .post(&vm_path(vm, "/replication/health/reset"), &())
                            .await?,
                    ]
                }
                Some(vm) => vec![client.get(&vm_path(vm, "/replication/health")).await?],
                None => client.get("/v1/replication/health").await?,
            };
            if let Some(path) = &csv {
                std::fs::write(path, health_csv(&list)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            if out.json(&list) {
                return Ok(());
            }
            if list.is_empty() {
                println!("No replicated VMs on this host.");
            }
            for h in &list {
                print_health(h);
            }
            if let Some(path) = &csv {
                eprintln!("saved as CSV to {}", path.display());
            }
            Ok(())
        }
        ReplicationCmd::Reverse {
            vm,
            to,
            replica_fingerprint,
            resync,
        } => {
            let (replica_name, replica_addr, fp) =
                resolve_replica(&to, replica_fingerprint).await?;
            // The old primary becomes a replica only with its own admin's consent (or a
            // planned failover that prepared it): given its admin endpoint, consent here.
            if let Some(ep) = admin_endpoint(&to)? {
                let _: ReplicationInfo = Client::new(ep)
                    .post(&vm_path(&vm, "/replication/accept-reverse"), &())
                    .await
                    .with_context(|| format!("{to} did not accept reverse replication of {vm}"))?;
            }
            let info: ReplicationInfo = client
                .post(
                    &vm_path(&vm, "/replication/reverse"),
                    &serde_json::json!({
                        "replica_name": replica_name,
                        "replica_addr": replica_addr,
                        "replica_fingerprint": fp,
                        "resync": resync,
                    }),
                )
                .await?;
            show(out, &info)
        }
        ReplicationCmd::Remove { vm } => {
            let reply: ActionReply = client.delete(&vm_path(&vm, "/replication")).await?;
            out.action(&reply);
            Ok(())
        }
    }
}

const CSV_COLUMNS: &str = "vm,role,state,health,primary_server,replica_server,from_time,to_time,average_size,maximum_size,average_latency_ms,maximum_latency_ms,errors,successful_cycles,missed_cycles,pending_bytes,last_synchronized_at,rpo_s,network_bytes,resynchronized_bytes,test_failover_status,details";

/// One RFC 4180 row per relationship (CRLF line ends, quotes only where needed), with
/// a header: the columns scripts read.
fn health_csv(list: &[ReplicationHealthInfo]) -> anyhow::Result<Vec<u8>> {
    let mut w = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::new());
    w.write_record(CSV_COLUMNS.split(','))?;
    let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
    for h in list {
        w.write_record([
            h.vm.clone(),
            h.role.clone(),
            h.state.clone(),
            h.health.clone(),
            h.primary_server.clone(),
            h.replica_server.clone(),
            time(h.from_time),
            time(h.to_time),
            h.average_size.to_string(),
            h.maximum_size.to_string(),
            h.average_latency_ms.to_string(),
            h.maximum_latency_ms.to_string(),
            h.errors.to_string(),
            h.successful_cycles.to_string(),
            h.missed_cycles.to_string(),
            h.pending_bytes.to_string(),
            opt(h.last_synchronized_at),
            opt(h.rpo_s),
            h.network_bytes.to_string(),
            h.resynchronized_bytes.to_string(),
            h.test_failover_status.clone(),
            h.details.join(" "),
        ])?;
    }
    Ok(w.into_inner().map_err(|e| e.into_error())?)
}

fn print_health(h: &ReplicationHealthInfo) {
    println!("VM:                      {} ({})", h.vm, h.role);
    println!("Replication state:       {} ({})", h.state_label, h.state);
    println!("Replication health:      {}", h.health.to_uppercase());
    for d in &h.details {
        println!("                         - {d}");
    }
    println!("Primary server:          {}", h.primary_server);
    println!("Replica server:          {}", h.replica_server);
    println!("From time:               {}", time(h.from_time));
    println!("To time:                 {}", time(h.to_time));
    println!("Average size:            {}", human(h.average_size));
    println!("Maximum size:            {}", human(h.maximum_size));
    println!(
        "Average latency:         {:.2} s",
        h.average_latency_ms as f64 / 1000.0
    );
    println!(
        "Maximum latency:         {:.2} s",
        h.maximum_latency_ms as f64 / 1000.0
    );
    println!("Errors encountered:      {}", h.errors);
    println!("Successful cycles:       {}", h.successful_cycles);
    println!(
        "Missed cycles:           {} of {} expected",
        h.missed_cycles, h.expected_cycles
    );
    if h.role == "primary" {
        println!("Pending replication:     {}", human(h.pending_bytes));
    }
    println!(
        "Last synchronized at:    {}",
        h.last_synchronized_at
            .map(time)
            .unwrap_or_else(|| "never".into())
    );
    println!(
        "RPO now:                 {}",
        h.rpo_s
            .map(|s| format!("{s} s"))
            .unwrap_or_else(|| "-".into())
    );
    if h.role == "replica" {
        println!("Test failover:           {}", h.test_failover_status);
    }
    println!();
}

/// `ferry events`: the latest events, then (with --follow) new ones as they come.
pub async fn events(
    client: &Client,
    vm: Option<&str>,
    follow: bool,
    last: usize,
    out: &Output,
) -> anyhow::Result<()> {
    let query = |after: i64| {
        let mut q = format!("/v1/events?after={after}&limit=10000");
        if let Some(vm) = vm {
            q.push_str(&format!("&vm={vm}"));
        }
        q
    };
    let all: Vec<EventInfo> = client.get(&query(0)).await?;
    let mut after = all.last().map(|e| e.id).unwrap_or(0);
    let shown = &all[all.len().saturating_sub(last)..];
    let json = out.format() == Format::Json;
    let print = |e: &EventInfo| {
        if json {
            println!("{}", serde_json::to_string(e).unwrap_or_default());
        } else {
            println!(
                "{:>6} {} {:<7} {:>5} {:<22} {:<12} {}",
                e.id,
                time(e.at_ms / 1000),
                e.severity,
                e.code,
                e.kind,
                e.vm.as_deref().unwrap_or("-"),
                e.message
            );
        }
    };
    if json && !follow {
        println!("{}", serde_json::to_string_pretty(shown)?);
        return Ok(());
    }
    for e in shown {
        print(e);
    }
    while follow {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let new: Vec<EventInfo> = client.get(&query(after)).await?;
        for e in &new {
            print(e);
        }
        if let Some(e) = new.last() {
            after = e.id;
        }
    }
    Ok(())
}

/// Polls the relationship, drawing a progress bar on a terminal, until `done` holds or the
/// state needs an administrator.
async fn watch(
    client: &Client,
    vm: &str,
    out: &Output,
    done: impl Fn(&ReplicationInfo) -> bool,
) -> anyhow::Result<ReplicationInfo> {
    let mut view = ProgressView::new(out);
    loop {
        let info: ReplicationInfo = client.get(&vm_path(vm, "/replication")).await?;
        match &info.progress {
            Some(p) => view.update(p),
            None => view.message(&info.state_label),
        }
        let stuck = matches!(
            info.state.as_str(),
            "resynchronization_required" | "suspended"
        );
        if done(&info) || stuck {
            view.finish();
            if stuck && !done(&info) {
                bail!(
                    "replication of {vm} is {}: {}",
                    info.state_label,
                    info.last_error
                        .as_deref()
                        .unwrap_or("see `ferry replication status`")
                );
            }
            return Ok(info);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn human(b: u64) -> String {
    match b {
        0..=1023 => format!("{b} B"),
        1024..=1048575 => format!("{:.1} KiB", b as f64 / 1024.0),
        1048576..=1073741823 => format!("{:.1} MiB", b as f64 / 1048576.0),
        _ => format!("{:.2} GiB", b as f64 / 1073741824.0),
    }
}

/// UNIX seconds as `YYYY-MM-DD HH:MM:SS` (UTC).
fn time(t: i64) -> String {
    ferry_domain::CivilTime::from_unix(t).to_string()
}

fn show(out: &Output, i: &ReplicationInfo) -> anyhow::Result<()> {
    if out.json(i) {
        return Ok(());
    }
    println!("VM:              {}", i.vm);
    println!("Role:            {}", i.role);
    println!("State:           {} ({})", i.state_label, i.state);
    println!(
        "{:<17}{} ({})",
        if i.role == "primary" {
            "Replica server:"
        } else {
            "Primary server:"
        },
        i.partner,
        i.partner_addr
    );
    println!("Interval:        {}s", i.interval_s);
    println!(
        "Recovery points: latest + {} additional{}",
        i.recovery_points,
        if i.role == "replica" {
            format!(" ({} now)", i.points)
        } else {
            String::new()
        }
    );
    println!(
        "Compression:     {}",
        if i.compression { "on" } else { "off" }
    );
    println!("Granularity:     {}", human(i.granularity as u64));
    if let Some(n) = i.app_consistent_every_s {
        println!("App-consistent:  at most every {n}s (guest agent)");
    }
    if !i.excluded_disks.is_empty() {
        println!("Excluded disks:  {:?}", i.excluded_disks);
    }
    if let Some(b) = i.bandwidth_limit {
        println!("Bandwidth limit: {}/s", human(b));
    }
    println!("Last cycle:      {}", i.last_cycle);
    println!(
        "Last point:      {}",
        i.last_point_at.map(time).unwrap_or_else(|| "-".into())
    );
    if i.pending_bytes > 0 {
        println!("Pending:         {}", human(i.pending_bytes));
    }
    if let Some(p) = &i.progress {
        println!(
            "Progress:        {} {}% ({} / {})",
            p.phase,
            p.percent,
            human(p.done_bytes),
            human(p.total_bytes)
        );
    }
    if let Some(e) = &i.last_error {
        println!("Last error:      {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_format_as_utc() {
        assert_eq!(super::time(0), "1970-01-01 00:00:00");
        assert_eq!(super::time(1_795_000_000), "2026-11-18 11:06:40");
    }

    #[test]
    fn health_csv_keeps_its_columns_quoting_and_crlf() {
        let h = ferry_api_types::ReplicationHealthInfo {
            vm: "web, \"one\"".into(),
            role: "primary".into(),
            state: "replicating".into(),
            state_label: "Replicating".into(),
            health: "warning".into(),
            details: vec!["RPO is 2 h,".into(), "a\nb".into()],
            primary_server: "a".into(),
            replica_server: "b".into(),
            from_time: 0,
            to_time: 60,
            average_size: 10,
            maximum_size: 20,
            average_latency_ms: 30,
            maximum_latency_ms: 40,
            errors: 1,
            successful_cycles: 2,
            missed_cycles: 3,
            expected_cycles: 5,
            pending_bytes: 0,
            last_synchronized_at: None,
            rpo_s: Some(7),
            data_bytes: 9,
            network_bytes: 8,
            resynchronized_bytes: 0,
            test_failover_status: "not running".into(),
            last_test_failover_at: None,
        };
        let text = String::from_utf8(super::health_csv(&[h]).unwrap()).unwrap();
        assert_eq!(
            text,
            format!(
                "{}\r\n\"web, \"\"one\"\"\",primary,replicating,warning,a,b,1970-01-01 00:00:00,1970-01-01 00:01:00,10,20,30,40,1,2,3,0,,7,8,0,not running,\"RPO is 2 h, a\nb\"\r\n",
                super::CSV_COLUMNS
            )
        );
    }
}
