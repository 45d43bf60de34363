//! Ferry's domain model: what a VM is, what makes a VM spec valid, and how a VM's
//! lifecycle moves between states. Pure: no IO, no tokio, no clock — callers pass in
//! whatever they observed, and get back the next state and the actions to perform.

pub mod health;
pub mod lifecycle;
pub mod name;
pub mod replication;
pub mod size;
pub mod spec;
pub mod time;

pub use lifecycle::{Action, LifecycleError, Operation, VmState};
pub use name::{NameError, VmName};
pub use replication::{Interval, ReplicationState, RetentionPolicy, Role};
pub use size::{parse_size, SizeError};
pub use spec::{
    Boot, BootDevice, CdromSpec, DiskBus, DiskRole, DiskSpec, Firmware, Machine, NicKind, NicSpec,
    ValidationError, VmSpec,
};
pub use time::CivilTime;
