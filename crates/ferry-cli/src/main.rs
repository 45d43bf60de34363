//! `ferry`: the command-line interface to ferryd, local (unix socket) or remote (TLS).

mod checkpoint;
mod console;
mod failover;
mod hosts;
mod output;
mod replication;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use ferry_api_types::{
    ActionReply, ConsoleLog, DiskRequest, NicRequest, ServerInfo, ShutdownRequest, VmCreateRequest,
    VmInfo,
};
use ferry_client::{Client, Endpoint};

use crate::output::Output;

/// Ferry: replication and disaster recovery for QEMU/KVM hosts.
#[derive(Parser)]
#[command(name = "ferry", version, about, propagate_version = true)]
struct Cli {
    /// The host to talk to: a name from `ferry host list`, an https://ADDR:PORT URL, or a
    /// unix socket path. Default: the local ferryd's socket.
    #[arg(long, global = true, env = "FERRY_HOST")]
    host: Option<String>,
    /// The local ferryd's admin socket.
    #[arg(
        long,
        global = true,
        env = "FERRY_SOCKET",
        default_value = "/run/ferry/ferryd.sock"
    )]
    socket: PathBuf,
    /// API token, for an https:// URL given with --host (visible to other users in the
    /// process list: prefer --token-file).
    #[arg(long, global = true, env = "FERRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the API token from this file (`-`: from standard input), for --host URL or
    /// `host add`.
    #[arg(
        long,
        global = true,
        env = "FERRY_TOKEN_FILE",
        conflicts_with = "token"
    )]
    token_file: Option<PathBuf>,
    /// Certificate fingerprint to pin, for an https:// URL given with --host.
    #[arg(long, global = true, env = "FERRY_FINGERPRINT")]
    fingerprint: Option<String>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Format::Text)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

/// Output formats.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people.
    Text,
    /// For scripts.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// This host's ferryd.
    #[command(subcommand)]
    Server(ServerCmd),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Other hosts this CLI knows (for --host NAME and the console).
    #[command(subcommand)]
    Host(HostCmd),
    /// This host's replica-server role: who may replicate to it, stored where.
    #[command(subcommand, name = "replica-server")]
    ReplicaServer(replication::ReplicaServerCmd),
    /// Replication of VMs: enable, status, recovery points, suspend/resume, remove.
    #[command(subcommand)]
    Replication(replication::ReplicationCmd),
    /// Failover of replicated VMs: unplanned failover, cancel, complete, test failover.
    #[command(subcommand)]
    Failover(failover::FailoverCmd),
    /// Checkpoints of a VM: create, list, apply, rename, delete, export.
    #[command(subcommand)]
    Checkpoint(checkpoint::CheckpointCmd),
    /// The event log: replication state and health changes, errors, resyncs.
    Events {
        /// Only this VM's events.
        #[arg(long)]
        vm: Option<String>,
        /// Keep printing new events as they happen.
        #[arg(long)]
        follow: bool,
        /// How many of the latest events to show first.
        #[arg(long, default_value_t = 50)]
        last: usize,
    },
    /// Hidden: `completions SHELL` and `man DIR`, for packaging.
    #[command(flatten)]
    Docs(ferry_docgen::DocsCmd),
}

#[derive(Subcommand)]
enum ServerCmd {
    /// Name, version, certificate fingerprint, accelerator, paths.
    Show,
}

#[derive(Subcommand)]
enum HostCmd {
    /// Known hosts.
    List,
    /// Remember a remote host: its URL, certificate fingerprint and API token.
    Add {
        /// A short name to use with --host.
        name: String,
        /// https://ADDR:PORT of its TLS API.
        url: String,
        /// Its certificate fingerprint (`ferry server show` on that host).
        #[arg(long)]
        fingerprint: String,
        /// Its API token (the api.token file in its data dir); or give --token-file.
        #[arg(long)]
        token: Option<String>,
    },
    /// Forget a host.
    Remove {
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Create a VM (it stays off until started).
    Create {
        /// The VM's name.
        name: String,
        /// Virtual CPUs.
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Memory, e.g. 512M or 2G.
        #[arg(long, default_value = "512M")]
        memory: String,
        /// A disk: a size for a new qcow2 (e.g. 20G), or a path of an image to import.
        /// Repeat for more disks.
        #[arg(long)]
        disk: Vec<String>,
        /// Boot this kernel directly instead of from disk.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initrd for --kernel.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line for --kernel.
        #[arg(long)]
        append: Option<String>,
        /// A NIC: bridge=BR, bridge (the host's default bridge), user, or none. Repeatable.
        #[arg(long)]
        nic: Vec<String>,
    },
    /// List VMs.
    List,
    /// Show a VM: state, pid, uptime, disks, NICs.
    Show {
        /// The VM.
        vm: String,
    },
    /// Start a VM.
    Start {
        /// The VM.
        vm: String,
    },
    /// Ask the guest to power off (ACPI) and wait for it.
    Shutdown {
        /// The VM.
        vm: String,
        /// Seconds to wait before giving up (the VM then keeps running).
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Power a VM off now (like pulling the plug; disks are closed cleanly).
    Stop {
        /// The VM.
        vm: String,
    },
    /// Pause a VM's vCPUs.
    Pause {
        /// The VM.
        vm: String,
    },
    /// Resume a paused VM.
    Resume {
        /// The VM.
        vm: String,
    },
    /// Delete a VM that is off, with its disks.
    Delete {
        /// The VM.
        vm: String,
    },
    /// Create a VM from a folder written by `ferry checkpoint export` (disks copied, new
    /// MAC addresses).
    Import {
        /// The export folder.
        dir: String,
        /// The new VM's name; default the exported VM's.
        #[arg(long)]
        name: Option<String>,
    },
    /// Attach to the VM's serial console (detach with Ctrl-]), or print what it printed.
    Console {
        /// The VM.
        vm: String,
        /// Print the console output captured so far instead of attaching.
        #[arg(long)]
        log: bool,
        /// With --log: keep printing new output until interrupted.
        #[arg(long, requires = "log")]
        follow: bool,
    },
}

fn main() -> ExitCode {
    // Like any Unix filter: `ferry vm list | head` ends quietly when the reader goes away,
    // instead of panicking on a broken pipe.
    // SAFETY: called first thing in main, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let out = Output::new(cli.output);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli, &out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            out.error(&e);
            ExitCode::FAILURE
        }
    }
}

fn endpoint(cli: &Cli) -> anyhow::Result<Endpoint> {
    let Some(host) = cli.host.as_deref() else {
        return Ok(Endpoint::Unix(cli.socket.clone()));
    };
    if host.starts_with('/') {
        return Ok(Endpoint::Unix(PathBuf::from(host)));
    }
    if let Some(addr) = host.strip_prefix("https://") {
        let (Some(token), Some(fingerprint)) = (given_token(cli, None)?, cli.fingerprint.clone())
        else {
            bail!("--host {host} needs --token-file (or --token) and --fingerprint (or `ferry host add` it first)");
        };
        return Ok(Endpoint::Tls {
            addr: addr.trim_end_matches('/').to_owned(),
            fingerprint,
            token,
        });
    }
    hosts::load()?.endpoint(host)
}

/// The token given on the command line, in a file, or on standard input.
fn given_token(cli: &Cli, explicit: Option<&String>) -> anyhow::Result<Option<String>> {
    if let Some(t) = explicit.or(cli.token.as_ref()) {
        return Ok(Some(t.clone()));
    }
    let Some(path) = &cli.token_file else {
        return Ok(None);
    };
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
            .context("cannot read the token from standard input")?
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --token-file {}", path.display()))?
    };
    let token = text.trim();
    if token.is_empty() {
        bail!("--token-file {} is empty", path.display());
    }
    Ok(Some(token.to_owned()))
}

async fn run(cli: Cli, out: &Output) -> anyhow::Result<()> {
    if let Command::Docs(docs) = &cli.command {
        return Ok(ferry_docgen::run(
            <Cli as clap::CommandFactory>::command(),
            docs,
        )?);
    }
    if let Command::Host(cmd) = &cli.command {
        return hosts::run(cmd_host(&cli, cmd)?, out);
    }
    let client = Client::new(endpoint(&cli)?);
    match cli.command {
        Command::Host(_) | Command::Docs(_) => unreachable!("handled above"),
        Command::Server(ServerCmd::Show) => {
            let info: ServerInfo = client.get("/v1/server").await?;
            out.server(&info);
        }
        Command::Vm(cmd) => vm(&client, cmd, out).await?,
        Command::ReplicaServer(cmd) => replication::replica_server(&client, cmd, out).await?,
        Command::Replication(cmd) => replication::replication(&client, cmd, out).await?,
        Command::Failover(cmd) => failover::failover(&client, cmd, out).await?,
        Command::Checkpoint(cmd) => checkpoint::checkpoint(&client, cmd, out).await?,
        Command::Events { vm, follow, last } => {
            replication::events(&client, vm.as_deref(), follow, last, out).await?
        }
    }
    Ok(())
}

fn cmd_host(cli: &Cli, cmd: &HostCmd) -> anyhow::Result<hosts::HostAction> {
    Ok(match cmd {
        HostCmd::List => hosts::HostAction::List,
        HostCmd::Add {
            name,
            url,
            fingerprint,
            token,
        } => hosts::HostAction::Add {
            name: name.clone(),
            url: url.clone(),
            fingerprint: fingerprint.clone(),
            token: given_token(cli, token.as_ref())?
                .ok_or_else(|| anyhow::anyhow!("host add needs --token-file FILE (or --token)"))?,
        },
        HostCmd::Remove { name } => hosts::HostAction::Remove { name: name.clone() },
    })
}

/// URL path for a VM (names may hold spaces).
pub(crate) fn vm_path(name: &str, suffix: &str) -> String {
    format!("/v1/vms/{}{suffix}", ferry_client::percent_encode(name))
}

async fn vm(client: &Client, cmd: VmCmd, out: &Output) -> anyhow::Result<()> {
    let action = |reply: ActionReply| out.action(&reply);
    match cmd {
        VmCmd::Create {
            name,
            cpus,
            memory,
            disk,
            kernel,
            initrd,
            append,
            nic,
        } => {
            let memory_bytes =
                ferry_domain_size(&memory).with_context(|| format!("--memory {memory}"))?;
            let mut disks = Vec::new();
            for d in &disk {
                disks.push(match ferry_domain_size(d) {
                    Ok(size_bytes) => DiskRequest::New { size_bytes },
                    Err(_) => DiskRequest::Import {
                        path: absolute(PathBuf::from(d))?,
                    },
                });
            }
            let mut nics = Vec::new();
            for n in &nic {
                match n.as_str() {
                    "none" => {}
                    "user" => nics.push(NicRequest::User),
                    "bridge" => nics.push(NicRequest::Bridge { bridge: None }),
                    other => match other.strip_prefix("bridge=") {
                        Some(br) => nics.push(NicRequest::Bridge {
                            bridge: Some(br.to_owned()),
                        }),
                        None => bail!("--nic {other}: use bridge=BR, bridge, user or none"),
                    },
                }
            }
            let req = VmCreateRequest {
                name,
                cpus,
                memory_mib: memory_bytes >> 20,
                disks,
                kernel: kernel.map(absolute).transpose()?,
                initrd: initrd.map(absolute).transpose()?,
                append,
                nics,
            };
            let info: VmInfo = client.post("/v1/vms", &req).await?;
            out.vm_created(&info);
        }
        VmCmd::List => {
            let vms: Vec<VmInfo> = client.get("/v1/vms").await?;
            out.vm_list(&vms);
        }
        VmCmd::Show { vm } => {
            let info: VmInfo = client.get(&vm_path(&vm, "")).await?;
            out.vm_show(&info);
        }
        VmCmd::Start { vm } => action(client.post(&vm_path(&vm, "/start"), &()).await?),
        VmCmd::Stop { vm } => action(client.post(&vm_path(&vm, "/stop"), &()).await?),
        VmCmd::Pause { vm } => action(client.post(&vm_path(&vm, "/pause"), &()).await?),
        VmCmd::Resume { vm } => action(client.post(&vm_path(&vm, "/resume"), &()).await?),
        VmCmd::Shutdown { vm, timeout } => {
            out.progress(&format!("waiting up to {timeout} s for {vm} to power off…"));
            let req = ShutdownRequest {
                timeout_s: Some(timeout),
            };
            action(client.post(&vm_path(&vm, "/shutdown"), &req).await?)
        }
        VmCmd::Delete { vm } => action(client.delete(&vm_path(&vm, "")).await?),
        VmCmd::Import { dir, name } => checkpoint::import(client, &dir, name, out).await?,
        VmCmd::Console { vm, log, follow } => {
            if log {
                let mut offset = 0;
                loop {
                    let chunk: ConsoleLog = client
                        .get(&vm_path(&vm, &format!("/console/log?offset={offset}")))
                        .await?;
                    out.console_text(&chunk);
                    offset = chunk.next_offset;
                    if !follow {
                        if chunk.text.is_empty() {
                            break;
                        }
                        continue;
                    }
                    if chunk.text.is_empty() {
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                }
            } else {
                let stream = client
                    .upgrade(&vm_path(&vm, "/console"), ferry_api_types::CONSOLE_UPGRADE)
                    .await?;
                console::attach(stream, &vm).await?;
            }
        }
    }
    Ok(())
}

fn ferry_domain_size(s: &str) -> anyhow::Result<u64> {
    ferry_api_types::parse_size(s).map_err(|e| anyhow::anyhow!(e))
}

pub(crate) fn absolute(p: PathBuf) -> anyhow::Result<String> {
    let abs = if p.is_absolute() {
        p
    } else {
        std::env::current_dir()?.join(p)
    };
    Ok(abs.display().to_string())
}
