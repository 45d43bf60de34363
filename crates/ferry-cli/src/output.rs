//! Printing results as text for people or JSON for scripts, and errors as one line on
//! stderr (with the whole cause chain).

use ferry_api_types::{ActionReply, ConsoleLog, ServerInfo, VmInfo};
use serde::Serialize;

use crate::Format;

/// Where and how results go.
pub struct Output {
    format: Format,
}

fn gib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

fn duration(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

impl Output {
    /// An output in `format`.
    pub fn new(format: Format) -> Self {
        Self { format }
    }

    /// The output format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Prints `v` as JSON in JSON mode; says whether it did.
    pub fn json<T: Serialize>(&self, v: &T) -> bool {
        if self.format == Format::Json {
            println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
            true
        } else {
            false
        }
    }

    /// A note while waiting: text mode, on a terminal only (scripts get results and
    /// one-line errors, nothing else).
    pub fn progress(&self, msg: &str) {
        use std::io::IsTerminal;
        if self.format == Format::Text && std::io::stderr().is_terminal() {
            eprintln!("{msg}");
        }
    }

    /// A failure: one line on stderr; in JSON mode a JSON object on stdout as well.
    pub fn error(&self, e: &anyhow::Error) {
        let chain = format!("{e:#}");
        if self.format == Format::Json {
            let code = e
                .downcast_ref::<ferry_client::ClientError>()
                .and_then(|c| c.code())
                .unwrap_or("error");
            println!(
                "{}",
                serde_json::json!({ "error": { "code": code, "message": chain } })
            );
        }
        eprintln!("ferry: error: {chain}");
    }

    /// `ferry server show`.
    pub fn server(&self, s: &ServerInfo) {
        if self.json(s) {
            return;
        }
        println!("Name:         {}", s.name);
        println!("Version:      {}", s.version);
        println!("Fingerprint:  {}", s.fingerprint);
        println!("TLS API:      {}", s.tls_listen);
        println!("Token file:   {}", s.token_file);
        println!("Accelerator:  {} ({})", s.accel, s.accel_reason);
        println!("Data dir:     {}", s.data_dir);
        println!("VM storage:   {}", s.vm_storage);
        println!(
            "Replication:  outgoing limit {}{}",
            s.replication_bandwidth_limit
                .map(|b| format!("{:.1} MiB/s", b as f64 / 1048576.0))
                .unwrap_or_else(|| "unlimited".into()),
            if s.replication_bandwidth_schedule.is_empty() {
                String::new()
            } else {
                format!(
                    " now (schedule {})",
                    s.replication_bandwidth_schedule.join(", ")
                )
            }
        );
        println!(
            "Bridge:       {}",
            s.default_bridge.as_deref().unwrap_or("(none)")
        );
        println!("VMs:          {}", s.vm_count);
    }

    /// The result of an action.
    pub fn action(&self, r: &ActionReply) {
        if !self.json(r) {
            println!("{}", r.message);
        }
    }

    /// `ferry vm create`.
    pub fn vm_created(&self, vm: &VmInfo) {
        if !self.json(vm) {
            println!(
                "VM {} created ({} vCPU, {} MiB, {} disk(s)); start it with `ferry vm start {}`",
                vm.name,
                vm.cpus,
                vm.memory_mib,
                vm.disks.len(),
                vm.name
            );
        }
    }

    /// `ferry vm list`.
    pub fn vm_list(&self, vms: &[VmInfo]) {
        if self.json(&vms) {
            return;
        }
        if vms.is_empty() {
            println!("No VMs. Create one with `ferry vm create NAME --disk 8G`.");
            return;
        }
        println!(
            "{:<24} {:<14} {:>8} {:>5} {:>9} {:>9}  {}",
            "NAME", "STATE", "PID", "CPUS", "MEMORY", "UPTIME", "REPLICATION"
        );
        for vm in vms {
            println!(
                "{:<24} {:<14} {:>8} {:>5} {:>9} {:>9}  {}",
                vm.name,
                vm.state.as_str(),
                vm.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                vm.cpus,
                format!("{}M", vm.memory_mib),
                vm.uptime_s.map(duration).unwrap_or_else(|| "-".into()),
                vm.replication.as_deref().unwrap_or("-"),
            );
        }
    }

    /// `ferry vm show`.
    pub fn vm_show(&self, vm: &VmInfo) {
        if self.json(vm) {
            return;
        }
        println!("Name:     {}", vm.name);
        println!("State:    {}", vm.state);
        println!(
            "PID:      {}",
            vm.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
        );
        println!(
            "Uptime:   {}",
            vm.uptime_s.map(duration).unwrap_or_else(|| "-".into())
        );
        println!("CPUs:     {}", vm.cpus);
        println!("Memory:   {} MiB", vm.memory_mib);
        println!("Boot:     {}", vm.boot);
        if let Some(a) = &vm.append {
            println!("Append:   {a}");
        }
        let machine = match vm.machine {
            ferry_api_types::Machine::Pc => "pc",
            ferry_api_types::Machine::Q35 => "q35",
        };
        let firmware = match (vm.firmware, vm.secure_boot) {
            (ferry_api_types::Firmware::Bios, _) => "bios",
            (ferry_api_types::Firmware::Uefi, false) => "uefi",
            (ferry_api_types::Firmware::Uefi, true) => "uefi, secure boot",
        };
        println!("Machine:  {machine}, firmware {firmware}");
        if !vm.boot_order.is_empty() {
            let order: Vec<&str> = vm.boot_order.iter().map(|d| d.as_str()).collect();
            println!("Order:    {}", order.join(","));
        }
        for d in &vm.disks {
            let bus = match (d.role, d.bus) {
                (ferry_api_types::DiskRole::Nvram, _) => "UEFI NVRAM",
                (_, ferry_api_types::DiskBus::VirtioBlk) => "virtio-blk",
                (_, ferry_api_types::DiskBus::VirtioScsi) => "virtio-scsi",
            };
            let raw = d
                .data_file
                .as_ref()
                .map(|f| format!(", data in raw {f}"))
                .unwrap_or_default();
            println!(
                "Disk:     {} {} ({}, {bus}{raw})",
                d.node,
                d.path,
                gib(d.size_bytes)
            );
        }
        if let Some(cd) = &vm.cdrom {
            println!("CD-ROM:   {}", cd.iso.as_deref().unwrap_or("(empty)"));
        }
        if vm.rng {
            println!("RNG:      virtio-rng");
        }
        for (list, what) in [
            (&vm.failover_ip, "Failover IP:"),
            (&vm.test_failover_ip, "Test failover IP:"),
        ] {
            for ip in list {
                let mut line = format!("{what} {} on NIC {}", ip.address, ip.mac);
                if let Some(gw) = &ip.gateway {
                    line.push_str(&format!(", gateway {gw}"));
                }
                if !ip.dns.is_empty() {
                    line.push_str(&format!(", DNS {}", ip.dns.join(" ")));
                }
                println!("{line}");
            }
        }
        if vm.nics.is_empty() {
            println!("NICs:     none");
        }
        for n in &vm.nics {
            match &n.bridge {
                Some(b) => println!("NIC:      bridge {b} {}", n.mac),
                None => println!("NIC:      {} {}", n.kind, n.mac),
            }
        }
        println!("Display:  {}", if vm.vnc { "VGA (VNC)" } else { "none" });
        if let Some(e) = &vm.last_error {
            println!("Last error: {e}");
        }
    }

    /// `ferry vm screenshot`.
    pub fn screenshot(&self, file: &std::path::Path, width: u32, height: u32, bytes: usize) {
        let file = file.display().to_string();
        if !self.json(&serde_json::json!({
            "file": file, "width": width, "height": height, "bytes": bytes,
        })) {
            println!("{file}: {width}x{height} PNG, {bytes} bytes");
        }
    }

    /// Console log text (raw, as the guest printed it).
    pub fn console_text(&self, c: &ConsoleLog) {
        if self.format == Format::Json {
            if !c.text.is_empty() {
                self.json(c);
            }
        } else {
            use std::io::Write;
            print!("{}", c.text);
            let _ = std::io::stdout().flush();
        }
    }
}

impl Output {
    /// A plain confirmation.
    pub fn message(&self, msg: &str) {
        if !self.json(&serde_json::json!({ "message": msg })) {
            println!("{msg}");
        }
    }

    /// `ferry host list`.
    pub fn hosts(&self, hosts: &std::collections::BTreeMap<String, serde_json::Value>) {
        if self.json(hosts) {
            return;
        }
        if hosts.is_empty() {
            println!("No hosts. Add one with `ferry host add NAME https://ADDR:PORT --fingerprint F --token T`.");
        }
        for (name, h) in hosts {
            println!(
                "{name:<16} {}  {}",
                h["url"].as_str().unwrap_or(""),
                h["fingerprint"].as_str().unwrap_or("")
            );
        }
    }
}
