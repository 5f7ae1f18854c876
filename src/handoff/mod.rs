//! What crosses the exec besides the snapshot: the descriptors, by name.
//!
//! The old image lists what it keeps in a [`Handoff`]; the runtime writes
//! that list (the manifest) into the snapshot and clears close-on-exec on
//! exactly those fds. The new image gets them back as an [`Inherited`] set
//! and claims each one by name, with a type check, like `listenfd` does for
//! systemd's sockets. That check (`SocketKind`) is also the one a listener
//! passed by socket activation gets.
//!
//! Where things are: [`Handoff`] (what the old image keeps) in `keep`,
//! [`Inherited`] (what the new image claims and takes) in `inherited`, the
//! socket type check in `kind`. The environment variables that name the
//! snapshot and the old binary are the upgrade's
//! ([`crate::upgrade::variable`]).
use std::collections::HashMap;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};

use crate::error::Error;
use crate::snapshot::{FdKind, GroupMember, Manifest, ManifestEntry, ManifestGroup};
use crate::sys;

pub use crate::env::{HANDOFF_VAR, ROLLBACK_REASON_VAR};

mod inherited;
mod keep;
mod kind;
#[cfg(test)]
mod tests;

pub use inherited::Inherited;
#[cfg(feature = "tokio")]
pub(crate) use inherited::failed;
pub use keep::{Handoff, StreamSocket};
pub(crate) use kind::{SocketKind, refuse};
