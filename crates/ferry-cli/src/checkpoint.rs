//! `ferry checkpoint …`: a VM's checkpoints (Hyper-V's "snapshots"), and `ferry vm import`
//! of an exported one.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Subcommand;
use ferry_api_types::{
    ActionReply, CheckpointCreated, CheckpointInfo, CheckpointKind, CheckpointList, VmInfo,
};
use ferry_client::Client;

use crate::output::Output;
use crate::progress::ProgressView;
use crate::vm_path;

#[derive(Subcommand)]
pub enum CheckpointCmd {
    /// Take a checkpoint. Production (default): the disks, with the guest's filesystems
    /// frozen through its agent if it has one (else crash-consistent). Standard: the disks
    /// plus memory and device state, so applying it resumes the VM where it was.
    Create {
        /// The VM (running or off).
        vm: String,
        /// A name (≤ 100 characters); default "VM (MM/DD/YYYY - hh:mm:ss AM/PM)", UTC.
        name: Option<String>,
        /// Include memory and device state (a running VM).
        #[arg(long, conflicts_with = "production")]
        standard: bool,
        /// Disks only (the default).
        #[arg(long)]
        production: bool,
    },
    /// The VM's checkpoints as a tree; "Now" marks where the VM's current state hangs.
    List {
        /// The VM.
        vm: String,
    },
    /// Return the VM to a checkpoint (a running VM is turned off first; a standard
    /// checkpoint then resumes it, a production one leaves it off).
    Apply {
        /// The VM.
        vm: String,
        /// The checkpoint's id or name.
        checkpoint: String,
        /// First take a checkpoint of the current state ("Create Checkpoint and Apply").
        #[arg(long)]
        checkpoint_first: bool,
    },
    /// Rename a checkpoint.
    Rename {
        /// The VM.
        vm: String,
        /// The checkpoint's id or name.
        checkpoint: String,
        /// Its new name.
        new_name: String,
    },
    /// Delete a checkpoint; the VM's current state and the other checkpoints keep their
    /// data.
    Delete {
        /// The VM.
        vm: String,
        /// The checkpoint's id or name.
        checkpoint: String,
        /// Also delete every checkpoint below it.
        #[arg(long)]
        subtree: bool,
    },
    /// Export a checkpoint to a new folder (disks and configuration) that
    /// `ferry vm import DIR` turns into a standalone VM.
    Export {
        /// The VM.
        vm: String,
        /// The checkpoint's id or name.
        checkpoint: String,
        /// A new or empty folder on the VM's host (absolute path).
        dir: String,
    },
}

fn cp_path(vm: &str, cp: &str, suffix: &str) -> String {
    vm_path(
        vm,
        &format!("/checkpoints/{}{suffix}", ferry_client::percent_encode(cp)),
    )
}

pub async fn checkpoint(client: &Client, cmd: CheckpointCmd, out: &Output) -> anyhow::Result<()> {
    let reply: ActionReply = match cmd {
        CheckpointCmd::Create {
            vm,
            name,
            standard,
            production: _,
        } => {
            let kind = if standard {
                CheckpointKind::Standard
            } else {
                CheckpointKind::Production
            };
            out.progress(&format!("Taking a checkpoint of {vm}…"));
            let created: CheckpointCreated = client
                .post(
                    &vm_path(&vm, "/checkpoints"),
                    &serde_json::json!({ "name": name, "kind": kind }),
                )
                .await?;
            if !out.json(&created) {
                println!("{}", created.message);
            }
            return Ok(());
        }
        CheckpointCmd::List { vm } => {
            let list: CheckpointList = client.get(&vm_path(&vm, "/checkpoints")).await?;
            if !out.json(&list) {
                print_tree(&list);
            }
            return Ok(());
        }
        CheckpointCmd::Apply {
            vm,
            checkpoint,
            checkpoint_first,
        } => {
            out.progress(&format!("Applying checkpoint {checkpoint} to {vm}…"));
            client
                .post(
                    &cp_path(&vm, &checkpoint, "/apply"),
                    &serde_json::json!({ "checkpoint_first": checkpoint_first }),
                )
                .await?
        }
        CheckpointCmd::Rename {
            vm,
            checkpoint,
            new_name,
        } => {
            let cp: CheckpointInfo = client
                .post(
                    &cp_path(&vm, &checkpoint, "/rename"),
                    &serde_json::json!({ "name": new_name }),
                )
                .await?;
            if !out.json(&cp) {
                println!("checkpoint {} of VM {vm} is now named {:?}", cp.id, cp.name);
            }
            return Ok(());
        }
        CheckpointCmd::Delete {
            vm,
            checkpoint,
            subtree,
        } => {
            let suffix = if subtree { "?subtree=true" } else { "" };
            client.delete(&cp_path(&vm, &checkpoint, suffix)).await?
        }
        CheckpointCmd::Export {
            vm,
            checkpoint,
            dir,
        } => {
            let dir = absolute(&dir)?;
            out.progress(&format!(
                "Exporting checkpoint {checkpoint} of {vm} to {dir}…"
            ));
            let body = serde_json::json!({ "dir": dir });
            let path = cp_path(&vm, &checkpoint, "/export");
            let export = client.post::<_, ActionReply>(&path, &body);
            tokio::pin!(export);
            // Progress from the VM's checkpoint list, while it runs.
            let mut view = ProgressView::new(out);
            loop {
                tokio::select! {
                    r = &mut export => {
                        view.finish();
                        break r?;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(300)), if view.active() => {
                        let list: Result<CheckpointList, _> =
                            client.get(&vm_path(&vm, "/checkpoints")).await;
                        if let Some(p) = list.ok().and_then(|l| l.progress) {
                            view.update(&p);
                        }
                    }
                }
            }
        }
    };
    out.action(&reply);
    Ok(())
}

/// `ferry vm import DIR [--name NAME]`.
pub async fn import(
    client: &Client,
    dir: &str,
    name: Option<String>,
    out: &Output,
) -> anyhow::Result<()> {
    let dir = absolute(dir)?;
    out.progress(&format!("Importing {dir}…"));
    let vm: VmInfo = client
        .post(
            "/v1/import",
            &serde_json::json!({ "dir": dir, "name": name }),
        )
        .await?;
    if !out.json(&vm) {
        println!(
            "VM {} imported from {dir} ({} disk(s)); start it with `ferry vm start {}`",
            vm.name,
            vm.disks.len(),
            vm.name
        );
    }
    Ok(())
}

/// Paths are resolved on this machine: a relative one is made absolute here (the daemon
/// needs absolute paths).
fn absolute(dir: &str) -> anyhow::Result<String> {
    Ok(std::path::absolute(dir)?.display().to_string())
}

/// Prints the tree, children indented under their parent, "Now" under the current position.
fn print_tree(list: &CheckpointList) {
    if list.checkpoints.is_empty() {
        println!("VM {} has no checkpoints", list.vm);
        return;
    }
    let mut children: BTreeMap<Option<i64>, Vec<&CheckpointInfo>> = BTreeMap::new();
    for c in &list.checkpoints {
        children.entry(c.parent_id).or_default().push(c);
    }
    fn walk(
        parent: Option<i64>,
        depth: usize,
        children: &BTreeMap<Option<i64>, Vec<&CheckpointInfo>>,
        current: Option<i64>,
    ) {
        for c in children.get(&parent).into_iter().flatten() {
            println!(
                "{}{} [{}] {} ({})",
                "  ".repeat(depth),
                c.name,
                c.id,
                c.kind,
                c.consistency
            );
            walk(Some(c.id), depth + 1, children, current);
        }
        if parent == current {
            println!("{}Now", "  ".repeat(depth));
        }
    }
    walk(None, 0, &children, list.current);
}
