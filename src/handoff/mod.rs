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
//! socket type check in `kind`, the two environment variables below in
//! `variable`.
//!
//! # The handoff variable, version 1
//!
//! `COPYOVER_HANDOFF=1:pid=PID:snapshot=FD:binary=FD:mode=MODE`
//!
//! * `pid`: the process that executed the new image. A process whose PID
//!   differs inherited the variable by mistake and starts fresh.
//! * `snapshot`: the sealed memfd holding the snapshot.
//! * `binary`: the previous binary, opened at its start-up, executed again
//!   if the new image fails before it is ready (rollback).
//! * `mode`: `upgrade` (a new binary starts) or `rollback` (the previous
//!   binary comes back after a failed upgrade; the reason is in
//!   `COPYOVER_ROLLBACK_REASON`).
//!
//! Optional fields, in this order when present:
//!
//! * `holder=PID`: the holder child that keeps the old image's descriptors
//!   and memory until an image is ready (see `sys::holder`); the image that
//!   becomes ready kills it.
//! * `exec=FD`: a sealed memfd holding the old image's argument vector and
//!   environment (see `rollback::ExecRecord`): a rollback starts the old
//!   binary exactly as it ran, whatever a wrapper script changed for the new
//!   one (an `LD_PRELOAD`, arguments). The image that becomes ready closes
//!   it.
//! * `nofile=N`: the old image's soft `RLIMIT_NOFILE`, put back before a
//!   rollback's exec (a new image started with a lower limit must not hand
//!   the old code a limit it cannot run under).
//! * `script=FD`: the new binary is a script, executed from this fd (its
//!   interpreter reads it as `/dev/fd/FD`); the image closes it at once.
//! * `rescued=1`: the holder started this (old) binary under its own PID
//!   after the new image died before it was ready, or missed the holder's
//!   deadline.
//!
//! # The claim variable, version 1
//!
//! `COPYOVER_CLAIM=1:claim=FD:held=NS`, beside the handoff variable after
//! a commit (and a rollback of it); a variable of its own, so that an older
//! build, whose handoff parser refuses fields it does not know, still
//! reads the handoff variable (it ignores this one, and the holder's
//! deadline still applies to it).
//!
//! * `claim`: the readiness claim, a pipe holding one byte (see
//!   `sys::claim`). The image that becomes ready reads the byte before it
//!   kills the holder; the holder reads it at its deadline before it kills
//!   the server's process. Whoever gets it ends the upgrade. A rescued
//!   image has none (there is no holder any more).
//! * `held`: when the holder started (`CLOCK_MONOTONIC`, nanoseconds), for
//!   the outcome's `unheld_ms`.
//!
//! A rollback hands the old binary the very text the old image wrote, with
//! `mode=rollback` and without `script=`: the old code reads its own format,
//! whatever fields a newer binary knows.
//!
//! The runtime removes both variables from the environment as soon as it has
//! read them, so they never reach a child process.

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
mod variable;

pub use inherited::Inherited;
pub use keep::{Handoff, StreamSocket};
pub(crate) use kind::{SocketKind, refuse};
pub(crate) use variable::{ClaimVar, HandoffVar, Mode};
