//! `ferry failover …`: failover of a replicated VM (run on the replica server), and test
//! failover.

use clap::Subcommand;
use ferry_api_types::ActionReply;
use ferry_client::Client;

use crate::output::Output;
use crate::vm_path;

#[derive(Subcommand)]
pub enum FailoverCmd {
    /// On the replica server: fail the VM over to a recovery point (unplanned failover:
    /// the primary is down). Complete or cancel it afterwards.
    Start {
        /// The replica VM.
        vm: String,
        /// The recovery point (id from `ferry replication points`); default the latest.
        #[arg(long)]
        point: Option<i64>,
        /// Start the VM once failed over.
        #[arg(long)]
        start: bool,
        /// Fail over although the primary sent a recovery point recently (it may still be
        /// running: two running copies diverge).
        #[arg(long)]
        force: bool,
    },
    /// On the primary: planned failover. The VM must be off; every change is shipped, this
    /// host will not start the VM, and the replica fails over to that point.
    Planned {
        /// The primary VM.
        vm: String,
        /// Start the VM on the replica server once failed over.
        #[arg(long)]
        start: bool,
        /// Then reverse replication: the replica replicates back to this host (delta only).
        #[arg(long)]
        reverse: bool,
    },
    /// Cancel a failover. On the primary: a planned failover (the VM may start here again).
    /// On the replica: the VM is turned off and what it wrote is discarded, so another
    /// recovery point can be chosen.
    Cancel {
        /// The replica VM.
        vm: String,
    },
    /// Complete a failover: keep the chosen recovery point, remove the others.
    Complete {
        /// The replica VM.
        vm: String,
    },
    /// On the replica server: boot a copy of the VM (`VM-test`, no network) from a recovery
    /// point while replication goes on (Hyper-V's Test Failover).
    Test {
        /// The replica VM.
        vm: String,
        /// The recovery point; default the latest.
        #[arg(long)]
        point: Option<i64>,
        /// Put the test VM's NICs on this bridge, an isolated test network (its test
        /// failover IP, `ferry vm set --test-failover-ip`, is then applied); default: no NICs.
        #[arg(long, value_name = "BRIDGE")]
        network: Option<String>,
    },
    /// Stop a test failover: the test VM and its disks are deleted, the points stay.
    StopTest {
        /// The replica VM.
        vm: String,
    },
}

pub async fn failover(client: &Client, cmd: FailoverCmd, out: &Output) -> anyhow::Result<()> {
    let reply: ActionReply = match cmd {
        FailoverCmd::Start {
            vm,
            point,
            start,
            force,
        } => {
            client
                .post(
                    &vm_path(&vm, "/failover"),
                    &serde_json::json!({ "point": point, "start": start, "force": force }),
                )
                .await?
        }
        FailoverCmd::Planned { vm, start, reverse } => {
            client
                .post(
                    &vm_path(&vm, "/failover/planned"),
                    &serde_json::json!({ "start": start, "reverse": reverse }),
                )
                .await?
        }
        FailoverCmd::Cancel { vm } => client.post(&vm_path(&vm, "/failover/cancel"), &()).await?,
        FailoverCmd::Complete { vm } => {
            client
                .post(&vm_path(&vm, "/failover/complete"), &())
                .await?
        }
        FailoverCmd::Test { vm, point, network } => {
            client
                .post(
                    &vm_path(&vm, "/replication/test-failover"),
                    &serde_json::json!({ "point": point, "network": network }),
                )
                .await?
        }
        FailoverCmd::StopTest { vm } => {
            client
                .delete(&vm_path(&vm, "/replication/test-failover"))
                .await?
        }
    };
    out.action(&reply);
    Ok(())
}
