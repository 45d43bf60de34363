//! `ferryd`: the per-host daemon. It owns the host's QEMU VMs and serves the admin API on
//! a unix socket and the remote API over TLS.

mod api;
mod broker;
mod checkpoints;
mod cluster;
mod config;
mod error;
mod identity;
mod limits;
mod peer;
mod replication;
mod server;
mod vms;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ferry_api_types::ServerInfo;
use ferry_qemu::process::{self, Accel};
use tracing::{error, info};

use crate::config::{AccelChoice, Config};

/// ferryd: Ferry's host daemon.
#[derive(Parser)]
#[command(name = "ferryd", version, about)]
struct Args {
    /// Hidden: `completions SHELL` and `man DIR`, for packaging.
    #[command(subcommand)]
    docs: Option<ferry_docgen::DocsCmd>,
    /// The configuration file.
    #[arg(
        long,
        short,
        default_value = "/etc/ferry/ferryd.toml",
        env = "FERRYD_CONFIG"
    )]
    config: PathBuf,
    /// Log lines as `text` (for people) or `json` (one object a line, for log collectors).
    #[arg(long, default_value = "text", env = "FERRY_LOG_FORMAT")]
    log_format: String,
}

fn main() -> ExitCode {
    // Everything ferryd creates (VM disks, replica layers, spools, keys, logs, the admin
    // socket from the moment it is bound) belongs to it alone, whatever umask started it.
    // SAFETY: umask(2) only changes this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    limits::raise_fd_limit();
    let args = Args::parse();
    if let Err(e) = init_logging(&args.log_format) {
        eprintln!("ferryd: error: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferryd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(false) => ExitCode::SUCCESS,
        Ok(true) => {
            // A committed certificate rotation: the same program with the same arguments,
            // in the same process (pid kept for the service manager), once every listener
            // of this one is closed.
            drop(runtime);
            use std::os::unix::process::CommandExt;
            let err = std::process::Command::new(
                std::env::current_exe().unwrap_or_else(|_| "ferryd".into()),
            )
            .args(std::env::args_os().skip(1))
            .exec();
            eprintln!("ferryd: cannot restart itself: {err}");
            ExitCode::FAILURE
        }
        Err(e) => {
            error!("{e:#}");
            eprintln!("ferryd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Log levels: error = an operation failed; warn = something a user should know (a VM
/// crashed); info = lifecycle of VMs and the daemon; debug = per-request detail. Lines
/// about a cycle, failover or checkpoint carry the VM, relationship and cycle as fields
/// (spans), which `--log-format json` keeps as JSON fields.
fn init_logging(format: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log redirected to a file must stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        "text" => fmt.with_ansi(ansi).init(),
        "json" => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        other => return Err(format!("unknown --log-format {other:?}: use text or json")),
    }
    Ok(())
}

/// config → identity → store → accelerator → VMs re-attached → servers → shutdown.
/// Runs ferryd until a signal; `Ok(true)` when it stopped to restart itself.
async fn run(args: Args) -> anyhow::Result<bool> {
    if let Some(docs) = &args.docs {
        ferry_docgen::run(<Args as clap::CommandFactory>::command(), docs)?;
        return Ok(false);
    }
    let cfg = Arc::new(Config::load(&args.config)?);
    for dir in [&cfg.data_dir, &cfg.vm_storage] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let identity = Arc::new(identity::Identity::load_or_create(
        &cfg.data_dir,
        &cfg.name,
    )?);
    let store = Arc::new(ferry_store::Store::open(&cfg.data_dir.join("ferry.db"))?);
    let (accel, accel_reason) = choose_accel(&cfg).await;
    info!(accel = accel.as_str(), reason = %accel_reason, "accelerator chosen");

    let vms = vms::VmManager::new(cfg.clone(), store.clone(), accel);
    vms.reattach_all()
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let replication =
        replication::Shared::new(cfg.clone(), store.clone(), identity.clone(), vms.clone());
    replication::start(&replication).await?;
    cluster::boot(&replication).await;
    broker::spawn_watcher(&replication);

    let restart = Arc::new(tokio::sync::Notify::new());
    let state = Arc::new(api::AppState {
        vms: vms.clone(),
        checkpoints: checkpoints::Checkpoints::new(replication.clone()),
        server: ServerInfo {
            name: cfg.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            fingerprint: identity.fingerprint.clone(),
            tls_listen: cfg.tls_listen.to_string(),
            token_file: identity.token_path.display().to_string(),
            accel: accel.as_str().to_owned(),
            accel_reason,
            data_dir: cfg.data_dir.display().to_string(),
            vm_storage: cfg.vm_storage.display().to_string(),
            default_bridge: cfg.default_bridge.clone(),
            vm_count: 0,
            replication_bandwidth_limit: None,
            replication_bandwidth_schedule: cfg
                .replication_bandwidth_schedule
                .iter()
                .map(|w| {
                    let hm = |m: u32| format!("{:02}:{:02}", m / 60, m % 60);
                    let rate = if w.limit == 0 {
                        "unlimited".to_owned()
                    } else {
                        w.limit.to_string()
                    };
                    format!("{}-{}={rate}", hm(w.from), hm(w.to))
                })
                .collect(),
        },
        tokens: Arc::new(identity::ApiTokens::new(
            identity.token.clone(),
            identity.token_path.clone(),
            store
                .setting(identity::PREVIOUS_TOKEN_KEY)
                .ok()
                .flatten()
                .as_deref(),
        )),
        replication: replication.clone(),
        restart: restart.clone(),
    });

    let unix = server::bind_unix(&cfg.admin_socket)
        .with_context(|| format!("cannot listen on {}", cfg.admin_socket.display()))?;
    let tcp = tokio::net::TcpListener::bind(cfg.tls_listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.tls_listen))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let unix_task = tokio::spawn(server::serve_unix(
        unix,
        api::router(state.clone()),
        stop_rx.clone(),
    ));
    let tls_task = tokio::spawn(server::serve_tls(
        tcp,
        identity.server_config()?,
        api::tls_router(state.clone()),
        stop_rx,
    ));
    info!(
        name = %cfg.name,
        admin_socket = %cfg.admin_socket.display(),
        tls = %cfg.tls_listen,
        fingerprint = %identity.fingerprint,
        "ferryd ready"
    );

    let restart_requested = tokio::select! {
        _ = wait_for_signal() => false,
        _ = restart.notified() => true,
    };
    info!("shutting down; VMs keep running and are re-attached at the next start");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = unix_task.await;
        let _ = tls_task.await;
    })
    .await;
    vms.detach_all();
    let _ = std::fs::remove_file(&cfg.admin_socket);
    info!("ferryd stopped");
    Ok(restart_requested)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn choose_accel(cfg: &Config) -> (Accel, String) {
    match cfg.accel {
        AccelChoice::Kvm => (Accel::Kvm, "set to kvm in the config".to_owned()),
        AccelChoice::Tcg => (Accel::Tcg, "set to tcg in the config".to_owned()),
        AccelChoice::Auto => {
            if process::probe_kvm(&cfg.qemu_binary, Duration::from_secs(3)).await {
                (Accel::Kvm, "a test boot under KVM succeeded".to_owned())
            } else {
                (
                    Accel::Tcg,
                    "a test boot under KVM did not complete in 3 s (or /dev/kvm is missing); using TCG".to_owned(),
                )
            }
        }
    }
}
