//! `ferry`: the command-line interface to ferryd, local (unix socket) or remote (TLS).

mod checkpoint;
mod cluster;
mod console;
mod failover;
mod hosts;
mod output;
mod progress;
mod replication;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use ferry_api_types::{
    ActionReply, BootDevice, CdromSpec, ConsoleLog, DiskBus, DiskRequest, ExecReply, ExecRequest,
    Firmware, ImageFormat, Machine, NicRequest, ServerInfo, ShutdownRequest, VmCreateRequest,
    VmInfo, VmSetRequest,
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
    /// Failover clusters: create, join, status, leave (Pacemaker/Corosync, shared storage).
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// A cluster's Replica Broker: the replica server of the whole cluster.
    #[command(subcommand, name = "replica-broker")]
    ReplicaBroker(cluster::BrokerCmd),
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
    /// Replace the API token; the current one stays valid for the grace period, so
    /// consoles and scripts can be given the new one without an outage.
    RotateToken {
        /// How long the current token keeps working (e.g. 1h, 30m; at most 7d).
        #[arg(long, default_value = "1h")]
        grace: String,
    },
    /// Rotate the host certificate without stopping replication: first prepare a successor
    /// (a new self-signed one, or --cert/--key from your CA), which every replication
    /// partner learns at its next session; then --commit, and ferryd restarts with it.
    RotateCertificate {
        /// The successor's certificate (PEM, chain after it), e.g. issued by your CA.
        #[arg(long, requires = "key", conflicts_with = "commit")]
        cert: Option<PathBuf>,
        /// Its private key (PEM).
        #[arg(long, requires = "cert", conflicts_with = "commit")]
        key: Option<PathBuf>,
        /// Switch to the prepared certificate (ferryd restarts; VMs keep running).
        #[arg(long)]
        commit: bool,
        /// With --commit: even if some partner has not learnt the successor yet.
        #[arg(long, requires = "commit")]
        force: bool,
    },
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
        /// A disk: a size for a new qcow2 (e.g. 20G), or the path of an existing image (a
        /// qcow2 is copied; a raw image or block device is used in place). Options after
        /// commas: format=qcow2|raw (needed unless the name ends in .qcow2/.raw or it is a
        /// block device), bus=virtio-blk|virtio-scsi. Repeat for more disks.
        #[arg(long)]
        disk: Vec<String>,
        /// Machine type: pc (i440FX, the default) or q35.
        #[arg(long)]
        machine: Option<String>,
        /// Firmware: bios (SeaBIOS, the default) or uefi (OVMF, with an NVRAM kept with the VM).
        #[arg(long)]
        firmware: Option<String>,
        /// UEFI Secure Boot with Microsoft's keys enrolled (needs --firmware uefi --machine q35).
        #[arg(long)]
        secure_boot: bool,
        /// A CD drive with this ISO in it.
        #[arg(long, conflicts_with = "cd_drive")]
        cdrom: Option<PathBuf>,
        /// An empty CD drive (insert a disc later with `ferry vm set VM --cdrom ISO`).
        #[arg(long)]
        cd_drive: bool,
        /// Firmware boot order, e.g. cdrom,disk,network (default: the first disk).
        #[arg(long)]
        boot: Option<String>,
        /// A virtio-rng device, so the guest has entropy early (installers, key generation).
        #[arg(long)]
        rng: bool,
        /// Boot this kernel directly instead of from disk.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initrd for --kernel.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// A graphical display: VGA and a USB tablet, seen through VNC on a unix socket
        /// only (the web console's Connect view, `ferry vm screenshot`). The default.
        #[arg(long, overrides_with = "no_vnc")]
        vnc: bool,
        /// No graphical display (serial console only).
        #[arg(long, overrides_with = "vnc")]
        no_vnc: bool,
        /// Kernel command line for --kernel.
        #[arg(long)]
        append: Option<String>,
        /// A NIC: bridge=BR, bridge (the host's default bridge), user, or none. Repeatable.
        #[arg(long)]
        nic: Vec<String>,
    },
    /// Change a VM's hardware: the CD drive (also while it runs), boot order, machine
    /// type and RNG (while it is off).
    Set {
        /// The VM.
        vm: String,
        /// Put this ISO into the CD drive (adds a drive to a VM that is off and has none).
        #[arg(long, conflicts_with = "eject")]
        cdrom: Option<PathBuf>,
        /// Empty the CD drive.
        #[arg(long)]
        eject: bool,
        /// Firmware boot order, e.g. cdrom,disk,network; an empty value resets it.
        #[arg(long)]
        boot: Option<String>,
        /// Machine type: pc or q35 (VM off).
        #[arg(long)]
        machine: Option<String>,
        /// Add (on) or remove (off) the virtio-rng device (VM off).
        #[arg(long)]
        rng: Option<String>,
        /// The guest's IP settings after a failover, per NIC (index from 0, or MAC):
        /// NIC=ADDR/PREFIX[,gw=IP][,dns=IP;IP]; repeat for more NICs; `none` removes them.
        /// Applied through qemu-guest-agent (systemd-networkd guests).
        #[arg(long = "failover-ip")]
        failover_ip: Vec<String>,
        /// The same for a test failover's VM.
        #[arg(long = "test-failover-ip")]
        test_failover_ip: Vec<String>,
    },
    /// Run a program in a running guest through qemu-guest-agent: its output, and its exit
    /// code as ours, e.g. `ferry vm exec web -- /usr/sbin/ip -4 addr`.
    Exec {
        /// The VM.
        vm: String,
        /// Give up after this many seconds (at most 600).
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// The program (absolute path in the guest) and its arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
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
    /// Save a PNG of a running VM's screen.
    Screenshot {
        /// The VM.
        vm: String,
        /// The PNG file to write (replaced if it exists).
        file: PathBuf,
    },
    /// Highly available VMs in a cluster: enable, disable.
    #[command(subcommand)]
    Ha(cluster::HaCmd),
    /// Live-migrate a running VM to another node of its cluster (shared storage; the guest
    /// keeps running, replication goes on from there).
    Migrate {
        /// The VM.
        vm: String,
        /// The node to move it to.
        #[arg(long)]
        to: String,
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
    // Pacemaker runs the OCF agent as `ferry ocf-agent ACTION` with OCF_RESKEY_* set: its
    // exit code is the OCF result, not ferry's usual 0/1.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("ocf-agent") {
        return ExitCode::from(cluster::ocf_agent(&args[2..]) as u8);
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
        Command::Server(ServerCmd::RotateCertificate {
            cert,
            key,
            commit,
            force,
        }) => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
            };
            let body = serde_json::json!({
                "action": if commit { "commit" } else { "prepare" },
                "cert": cert.as_ref().map(read).transpose()?,
                "key": key.as_ref().map(read).transpose()?,
                "force": force,
            });
            let reply: serde_json::Value = client.post("/v1/server/certificate", &body).await?;
            if !out.json(&reply) {
                if let Some(next) = reply["next_fingerprint"].as_str() {
                    println!("Next certificate: {next}");
                } else {
                    println!(
                        "Certificate:      {}",
                        reply["fingerprint"].as_str().unwrap_or("-")
                    );
                }
                println!("{}", reply["message"].as_str().unwrap_or(""));
            }
        }
        Command::Server(ServerCmd::RotateToken { grace }) => {
            let grace = ferry_domain::replication::parse_duration(&grace)
                .map_err(|e| anyhow::anyhow!("--grace {grace}: {e}"))?;
            let reply: serde_json::Value = client
                .post(
                    "/v1/server/rotate-token",
                    &serde_json::json!({ "grace_s": grace.as_secs() }),
                )
                .await?;
            if !out.json(&reply) {
                println!(
                    "New API token (also in {}):",
                    reply["token_file"].as_str().unwrap_or("-")
                );
                println!("{}", reply["token"].as_str().unwrap_or(""));
                println!(
                    "The previous token keeps working until {} (UNIX time); give the new one to the console and scripts before then.",
                    reply["previous_valid_until"]
                );
            }
        }
        Command::Vm(cmd) => vm(&client, cmd, out).await?,
        Command::ReplicaServer(cmd) => replication::replica_server(&client, cmd, out).await?,
        Command::Replication(cmd) => replication::replication(&client, cmd, out).await?,
        Command::Failover(cmd) => failover::failover(&client, cmd, out).await?,
        Command::Checkpoint(cmd) => checkpoint::checkpoint(&client, cmd, out).await?,
        Command::Cluster(cmd) => cluster::cluster(&client, cmd, out).await?,
        Command::ReplicaBroker(cmd) => cluster::broker(&client, cmd, out).await?,
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

/// Width and height from a PNG's IHDR chunk (the first one, at a fixed offset).
fn png_size(png: &[u8]) -> anyhow::Result<(u32, u32)> {
    if png.len() < 24 || &png[..8] != b"\x89PNG\r\n\x1a\n" || &png[12..16] != b"IHDR" {
        bail!("no PNG signature and header");
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Ok((be(&png[16..20]), be(&png[20..24])))
}

/// URL path for a VM (names may hold spaces).
pub(crate) fn vm_path(name: &str, suffix: &str) -> String {
    format!("/v1/vms/{}{suffix}", ferry_client::percent_encode(name))
}

async fn vm(client: &Client, cmd: VmCmd, out: &Output) -> anyhow::Result<()> {
    let action = |reply: ActionReply| out.action(&reply);
    match cmd {
        VmCmd::Ha(cmd) => cluster::ha(client, cmd, out).await?,
        VmCmd::Migrate { vm, to } => cluster::migrate(client, &vm, &to, out).await?,
        VmCmd::Create {
            name,
            cpus,
            memory,
            disk,
            kernel,
            initrd,
            vnc: _,
            no_vnc,
            append,
            nic,
            machine,
            firmware,
            secure_boot,
            cdrom,
            cd_drive,
            boot,
            rng,
        } => {
            let memory_bytes =
                ferry_domain_size(&memory).with_context(|| format!("--memory {memory}"))?;
            let mut disks = Vec::new();
            for d in &disk {
                disks.push(parse_disk(d)?);
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
                vnc: Some(!no_vnc),
                append,
                nics,
                machine: machine
                    .as_deref()
                    .map(parse_machine)
                    .transpose()?
                    .unwrap_or_default(),
                firmware: match firmware.as_deref() {
                    None | Some("bios") => Firmware::Bios,
                    Some("uefi") => Firmware::Uefi,
                    Some(other) => bail!("--firmware {other}: use bios or uefi"),
                },
                secure_boot,
                cdrom: match (cdrom, cd_drive) {
                    (Some(iso), _) => Some(CdromSpec {
                        iso: Some(absolute(iso)?),
                    }),
                    (None, true) => Some(CdromSpec { iso: None }),
                    (None, false) => None,
                },
                boot_order: boot
                    .as_deref()
                    .map(parse_boot)
                    .transpose()?
                    .unwrap_or_default(),
                rng,
                nvram: None,
            };
            let info: VmInfo = client.post("/v1/vms", &req).await?;
            out.vm_created(&info);
        }
        VmCmd::Set {
            vm,
            cdrom,
            eject,
            boot,
            machine,
            rng,
            failover_ip,
            test_failover_ip,
        } => {
            let ips = |v: Vec<String>| match v.as_slice() {
                [] => None,
                [none] if none == "none" => Some(Vec::new()),
                _ => Some(v),
            };
            let req = VmSetRequest {
                failover_ip: ips(failover_ip),
                test_failover_ip: ips(test_failover_ip),
                cdrom: cdrom.map(absolute).transpose()?,
                eject,
                boot_order: boot.as_deref().map(parse_boot).transpose()?,
                machine: machine.as_deref().map(parse_machine).transpose()?,
                rng: match rng.as_deref() {
                    None => None,
                    Some("on") => Some(true),
                    Some("off") => Some(false),
                    Some(other) => bail!("--rng {other}: use on or off"),
                },
            };
            let info: VmInfo = client.post(&vm_path(&vm, "/set"), &req).await?;
            out.vm_show(&info);
        }
        VmCmd::Exec { vm, timeout, argv } => {
            let req = ExecRequest {
                argv,
                timeout_s: Some(timeout),
            };
            let r: ExecReply = client.post(&vm_path(&vm, "/exec"), &req).await?;
            if !out.json(&r) {
                use std::io::Write as _;
                print!("{}", r.stdout);
                eprint!("{}", r.stderr);
                std::io::stdout().flush().ok();
            }
            if r.exit_code != 0 {
                std::process::exit(r.exit_code.clamp(1, 255));
            }
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
        VmCmd::Screenshot { vm, file } => {
            let png = client.get_bytes(&vm_path(&vm, "/screenshot")).await?;
            let (width, height) = png_size(&png)
                .with_context(|| format!("ferryd's screenshot of {vm} is not a PNG"))?;
            std::fs::write(&file, &png)
                .with_context(|| format!("cannot write {}", file.display()))?;
            out.screenshot(&file, width, height, png.len());
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

/// `--disk SIZE|PATH[,format=qcow2|raw][,bus=virtio-blk|virtio-scsi]`.
fn parse_disk(arg: &str) -> anyhow::Result<DiskRequest> {
    let mut parts = arg.split(',');
    let what = parts.next().unwrap_or_default();
    let (mut format, mut bus) = (None, DiskBus::VirtioBlk);
    for opt in parts {
        match opt.split_once('=') {
            Some(("format", "qcow2")) => format = Some(ImageFormat::Qcow2),
            Some(("format", "raw")) => format = Some(ImageFormat::Raw),
            Some(("bus", "virtio-blk")) => bus = DiskBus::VirtioBlk,
            Some(("bus", "virtio-scsi")) => bus = DiskBus::VirtioScsi,
            Some(("format", f)) => bail!("--disk {arg}: unknown format {f:?}; use qcow2 or raw"),
            Some(("bus", b)) => {
                bail!("--disk {arg}: unknown bus {b:?}; use virtio-blk or virtio-scsi")
            }
            _ => bail!("--disk {arg}: unknown option {opt:?}; use format=qcow2|raw or bus=virtio-blk|virtio-scsi"),
        }
    }
    Ok(match ferry_domain_size(what) {
        Ok(size_bytes) if format.is_none() => DiskRequest::New { size_bytes, bus },
        Ok(_) => bail!("--disk {arg}: format= is for existing images, not new disks"),
        Err(_) => DiskRequest::Import {
            path: absolute(PathBuf::from(what))?,
            format,
            bus,
        },
    })
}

fn parse_machine(s: &str) -> anyhow::Result<Machine> {
    match s {
        "pc" => Ok(Machine::Pc),
        "q35" => Ok(Machine::Q35),
        other => bail!("--machine {other}: use pc or q35"),
    }
}

/// `--boot cdrom,disk,network`; an empty value is the default order.
fn parse_boot(s: &str) -> anyhow::Result<Vec<BootDevice>> {
    s.split(',')
        .filter(|d| !d.is_empty())
        .map(|d| {
            BootDevice::parse(d).ok_or_else(|| {
                anyhow::anyhow!("--boot {s}: unknown device {d:?}; use cdrom, disk and network")
            })
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_arguments() {
        assert_eq!(
            parse_disk("20G").unwrap(),
            DiskRequest::New {
                size_bytes: 20 << 30,
                bus: DiskBus::VirtioBlk
            }
        );
        assert_eq!(
            parse_disk("/dev/vg0/db,bus=virtio-scsi").unwrap(),
            DiskRequest::Import {
                path: "/dev/vg0/db".into(),
                format: None,
                bus: DiskBus::VirtioScsi
            }
        );
        assert_eq!(
            parse_disk("/srv/old.img,format=raw").unwrap(),
            DiskRequest::Import {
                path: "/srv/old.img".into(),
                format: Some(ImageFormat::Raw),
                bus: DiskBus::VirtioBlk
            }
        );
        for (bad, want) in [
            ("8G,format=raw", "format= is for existing images"),
            ("/x.img,format=vmdk", "unknown format \"vmdk\""),
            ("/x.img,bus=ide", "unknown bus \"ide\""),
            ("/x.img,cache=none", "unknown option \"cache=none\""),
        ] {
            let err = parse_disk(bad).unwrap_err().to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn boot_order_and_machine() {
        assert_eq!(
            parse_boot("cdrom,disk,network").unwrap(),
            [BootDevice::Cdrom, BootDevice::Disk, BootDevice::Network]
        );
        assert!(parse_boot("").unwrap().is_empty());
        assert!(parse_boot("cdrom,floppy")
            .unwrap_err()
            .to_string()
            .contains("unknown device \"floppy\""));
        assert_eq!(parse_machine("q35").unwrap(), Machine::Q35);
        assert!(parse_machine("isapc").is_err());
    }
}
