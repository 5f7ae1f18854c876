//! Migration to a new process: the same handoff as an upgrade, given to a
//! new process beside the old one instead of to the same PID after an exec.
//!
//! # Why
//!
//! An exec cannot change what a process is: its cgroup, its user, its
//! namespaces, its limits. A migration starts a **new process** (the old
//! one's child, through the binary's path, so a wrapper script may change
//! any of those; or [one started elsewhere](#an-external-newcomer)) and
//! hands it every kept descriptor and the state; the old process exits
//! once the new one is ready. Or [gradually](#a-gradual-migration-protocol-version-1):
//! both serve, and users move a batch at a time.
//!
//! # The sequence
//!
//! It asks nothing new of the application: SIGUSR2 (or
//! [`Copyover::request_migration`](crate::Copyover::request_migration), or
//! `copyover migrate PID`) gives the same [`Event::Upgrade`](crate::Event::Upgrade) and
//! [`Event::UpgradeApproved`](crate::Event::UpgradeApproved) as SIGHUP, and the same
//! [`Copyover::upgrade`](crate::Copyover::upgrade) calls answer them.
//!
//! 1. **Probe**, exactly as for an upgrade: a binary that cannot read this
//!    state is refused before anything else happens.
//! 2. **The newcomer starts** as soon as the probe said yes (on the
//!    runtime's helper thread: the `fork` copies the page tables), in a
//!    process group of its own, inheriting nothing but its end of a private
//!    socket pair and its standard streams: it runs until its `boot`, which
//!    checks what it can, says `hello` and waits on that socket pair
//!    (`SOCK_SEQPACKET`; one end is inherited by the child alone, so
//!    nothing else can connect). `Event::UpgradeApproved` comes only
//!    after that `hello`: the new process's loading and start-up happen
//!    while the old process still serves, outside the blackout. One that
//!    does not reach `boot` within `Config::probe_timeout` is refused.
//! 3. **Commit** (the second `upgrade` call): the state is sealed into a
//!    memfd as for an exec, and the memfd and every kept descriptor go over
//!    the socket (`SCM_RIGHTS`, at most 253 a message, received
//!    close-on-exec). The old process closes nothing and executes nothing.
//! 4. The newcomer's `boot` checks the snapshot and returns
//!    [`Start::Resumed`](crate::Start::Resumed) with the state and the
//!    descriptors, as after an exec. Its [`ready`](crate::Copyover::ready)
//!    says `ready` and waits for the old process's `go`.
//! 5. The old process answers `go`, passes on the requests that reached
//!    it meanwhile, writes `migrated` to its status file, waits (a second
//!    at most) for the newcomer to say `joined` (it moved into the old
//!    process's process group, which the old one's exit could otherwise
//!    take away), and exits. (Asked to stay, `copyover migrate --stay`,
//!    it instead points every descriptor it handed over at `/dev/null`
//!    and waits, serving nobody, for SIGTERM.) The newcomer serves,
//!    reports `complete` (`READY=1`), and once the old process is gone
//!    tells systemd `MAINPID=` (its own).
//!
//! # Under systemd
//!
//! The unit needs `ExitType=cgroup` (the old main process's exit must not
//! end the service) and `NotifyAccess=all` (the new process is not the
//! main one when it speaks). The new process says `MAINPID=` only once
//! the old one is gone, when it is the manager's own child: a main PID
//! named while it was another process's child is one systemd calls
//! "alien", and a `systemctl stop` then SIGKILLs it without waiting for
//! its SIGTERM (seen with systemd 252).
//!
//! # When it fails
//!
//! Until it sends `go`, the old process owns every client: it never closed
//! a descriptor and the newcomer has served no one (it is waiting in
//! `ready`). A newcomer that refuses (its `boot` failed), dies, or is not
//! ready within the old process's `Config::ready_timeout` from the commit
//! is killed with its process group, and the old process serves on, with
//! its state as it was:
//! `upgrade` returns [`UpgradeError::Migration`](crate::UpgradeError::Migration)
//! and the outcome is `rolled back`. An old process that dies after handing
//! over (SIGKILL) leaves the newcomer serving: its `ready` sees the socket
//! end and takes over.
//!
//! Both processes hold the same open files until the old one exits, and a
//! read by either consumes the same bytes: like an upgraded image, a
//! newcomer reads and writes nothing on an adopted descriptor before
//! `ready` (a TLS session crossing with [`crate::tls`] refuses to).
//!
//! # The migration variable, version 1
//!
//! `COPYOVER_MIGRATE=1:socket=FD:from=PID`, set by the old process for
//! its newcomer only, removed by `boot` at once.
//!
//! * `socket`: the newcomer's end of the socket pair.
//! * `from`: the old process.
//!
//! # The protocol, version 1
//!
//! Messages on the socket pair, one `SOCK_SEQPACKET` message each, ASCII:
//!
//! | From | Message | Descriptors |
//! |---|---|---|
//! | new | `hello 1`, as its `boot` starts | none |
//! | old | `snapshot 1 COUNT` | the sealed snapshot memfd, and a pidfd of the old process |
//! | old | `fds` | up to 253 of the manifest's, in its order, until COUNT came |
//! | new | `ready`, or `fail REASON` | none |
//! | old | `go` | none |
//! | new | `joined`, once in the old process's process group | none |
//!
//! The end of the socket is an answer too: before `ready`, the newcomer
//! died; after it, the old process did, and the newcomer serves, but only
//! if the old process's pidfd says it is gone. Otherwise the old process
//! gave up on a newcomer it could not kill (one that took other
//! credentials, or a wrapper's child outside the group it killed), and
//! kept its clients: the newcomer exits without touching them.
//!
//! # An external newcomer
//!
//! With [`Config::migration_socket`](crate::Config::migration_socket), the
//! old process listens at `PID.migration` in its status directory
//! (`SOCK_SEQPACKET`; the file open to whoever reaches the directory, the
//! kernel's `SO_PEERCRED` record of the peer checked: this process's user,
//! or one named by [`Config::migration_peer`](crate::Config::migration_peer);
//! anything else is refused, logged, and sent nothing). A process started
//! with `COPYOVER_JOIN=PATH` connects there from its `boot` and says
//! `hello 1`; the migration then starts as for SIGUSR2, with one more
//! exchange in place of the probe and the start:
//!
//! | From | Message | Descriptors |
//! |---|---|---|
//! | old | `probe 1` | the snapshot as it would be handed over (no descriptors in it) |
//! | new | `ok-migrate VERSION` (it checked the snapshot as a probed binary does), or `fail REASON` | none |
//!
//! and the rest of the protocol above. Such a newcomer is not the old
//! process's to kill: on a failure its socket closes, it sees the old
//! process alive, and exits. It stays in its own process group.
//!
//! # A gradual migration: protocol, version 1
//!
//! Asked with `copyover migrate PID --batch N --every SECS` (which writes
//! `gradual N MS` to `PID.migrate` in the status directory before its
//! SIGUSR2; `back` asks for everyone back) or
//! [`Copyover::request_gradual_migration`](crate::Copyover::request_gradual_migration).
//! The hand-over above carries the shared part only, and ends with `share`
//! instead of `go`: both processes serve. The socket pair stays, read by a
//! thread in each process; in either direction:
//!
//! | Message | Descriptors | Meaning |
//! |---|---|---|
//! | `users ID COUNT SEEN` | a sealed memfd of the records | batch ID, its COUNT descriptors follow in `fds` messages (253 at most each); SEEN: how many forwarded messages the sender had handled |
//! | `took ID` | none | the receiver holds batch ID, untouched |
//! | `yours ID` / `mine ID` | none | the sender's decision (`mine`: its time ran out, or it could not send the whole batch) |
//! | `refused ID REASON` | none | the receiver cannot take batch ID (records that do not decode, descriptors that do not fit) |
//! | `fwd BYTES` | none | an application message ([`Copyover::forward`](crate::Copyover::forward)) |
//! | `ack N` | none | N forwarded messages handled (every 64): the sender forgets those |
//! | `back BATCH MS` | none | old to new: move everyone back |
//! | `done` | none | the sender has no users left and exits |
//! | `joined` | none | new to old, after the old process's `done` |
//!
//! A batch is the sender's until it sends `yours`, which it sends only
//! after `took`; the receiver serves a batch only after `yours`, or after
//! the link's end once the sender's pidfd says it is gone. The end of the
//! link with the other process alive (the link broke) leaves each process
//! serving the users it has.

mod arrival;
mod departure;
mod door;
mod gradual;
mod link;
mod numbers;

pub(crate) use arrival::{Answer, Arrival, arrive, join};
pub(crate) use departure::{Arriving, HandOver, Newcomer, hand_over};
pub(crate) use door::{Door, Knock};
pub use gradual::{Arrived, Batch};
pub(crate) use gradual::{Ending, Step, Window};
pub use link::MAX_FORWARD;

use crate::error::Error;

/// The newcomer is in its `boot`.
const HELLO: &[u8] = b"hello 1";
/// The first message's word and the protocol's version.
const SNAPSHOT: &str = "snapshot 1";
/// An external newcomer's probe: the snapshot, without descriptors.
const PROBE: &[u8] = b"probe 1";
/// The answer to it.
const OK_MIGRATE: &str = "ok-migrate ";
/// A batch of descriptors.
const FDS: &[u8] = b"fds";
/// The newcomer is ready.
const READY: &[u8] = b"ready";
/// The newcomer could not take over; a reason follows.
const FAIL: &str = "fail ";
/// The old process hands over for good.
const GO: &[u8] = b"go";
/// The old process hands the shared part over and both serve: a gradual
/// migration.
const SHARE: &[u8] = b"share";
/// The newcomer is in the old process's process group.
const JOINED: &[u8] = b"joined";
/// The longest message.
const MAX_MESSAGE: usize = 4096;

/// The parsed migration variable (see the [module docs](self#the-migration-variable-version-1)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MigrateVar {
    pub socket: std::os::fd::RawFd,
    pub from: u32,
}

impl MigrateVar {
    pub(crate) fn format(&self) -> String {
        format!("1:socket={}:from={}", self.socket, self.from)
    }

    pub(crate) fn parse(value: &str) -> Result<MigrateVar, Error> {
        let bad = |reason: &str| Error::HandoffVar {
            var: crate::env::MIGRATE_VAR,
            value: value.into(),
            reason: reason.into(),
        };
        let rest = value
            .strip_prefix("1:")
            .ok_or_else(|| bad("not version 1"))?;
        let (mut socket, mut from) = (None, None);
        for part in rest.split(':') {
            match part.split_once('=') {
                Some(("socket", v)) => socket = v.parse().ok().filter(|fd| *fd >= 0),
                Some(("from", v)) => from = v.parse().ok().filter(|pid| *pid > 0),
                _ => return Err(bad(&format!("unknown field {part:?}"))),
            }
        }
        Ok(MigrateVar {
            socket: socket.ok_or_else(|| bad("no socket=FD"))?,
            from: from.ok_or_else(|| bad("no from=PID"))?,
        })
    }
}

/// Reads the migration variable, if it is set. Whether this process is
/// the newcomer is then the socket's to say: it must be an inherited
/// `SOCK_SEQPACKET` socket (see `arrive`). A wrapper may start the binary
/// through a fork of its own (a new PID namespace, say): the socket is what
/// it inherits, not the parent's PID.
pub(crate) fn read_var() -> Result<Option<MigrateVar>, Error> {
    let Some(value) = std::env::var_os(crate::env::MIGRATE_VAR) else {
        return Ok(None);
    };
    MigrateVar::parse(&value.to_string_lossy()).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_reads_back_and_refuses_what_it_does_not_know() {
        let v = MigrateVar {
            socket: 7,
            from: 42,
        };
        assert_eq!(MigrateVar::parse(&v.format()).unwrap(), v);
        for bad in [
            "2:socket=7:from=42",
            "1:socket=7",
            "1:from=42",
            "1:socket=-1:from=42",
            "1:socket=7:from=0",
            "1:socket=7:from=42:extra=1",
        ] {
            assert!(MigrateVar::parse(bad).is_err(), "{bad}");
        }
    }
}
