//! Crash survival under systemd: the service's file descriptor store and a
//! sealed state checkpoint.
//!
//! An upgrade keeps every client because the process never dies. A crash
//! (SIGKILL, SIGSEGV, the OOM killer) kills the process and, with it, the
//! last reference to each connection: every client gets EOF. Unless someone
//! else holds a reference. systemd can: a service may hand it descriptors
//! to keep (`FDSTORE=1`, with `FileDescriptorStoreMax=` in the unit), and
//! systemd passes them back to the next start of the service, after a crash
//! and `Restart=on-failure` too, through `LISTEN_FDS` and `LISTEN_FDNAMES`.
//!
//! So, once enabled ([`Copyover::enable_fdstore`]):
//!
//! * the application stores each listener and connection when it opens it
//!   ([`Copyover::store_fd`]) and removes it when it closes it
//!   ([`Copyover::unstore_fd`]): systemd's copy would otherwise keep a closed
//!   connection open;
//! * it refreshes a checkpoint of its state with one call
//!   ([`Copyover::checkpoint`]): the state is written, in the snapshot
//!   format, to a new sealed memfd that goes to the store, and the previous
//!   checkpoint is removed from it. Cheap enough to call after every batch of
//!   events that changed the state, or every second;
//! * after a crash, [`boot`](crate::boot) finds the checkpoint among the
//!   passed descriptors and returns [`Start::Resumed`](crate::Start) with the
//!   last checkpoint's state and **every stored descriptor**, including
//!   connections opened after that checkpoint (their names are in
//!   [`Inherited::names`](crate::Inherited::names); the application decides
//!   what to do with them).
//!
//! # What a crash loses
//!
//! State changes after the last checkpoint; input the process had read but
//! not yet reflected in a checkpoint; output it had not written to the
//! socket yet. Bytes a client sends while the service is down wait in the
//! kernel and are read after the restart: the client sees a stall, not a
//! disconnect.
//!
//! # Names
//!
//! systemd's descriptor names may not contain `:` or control characters and
//! are at most 255 bytes. A stored name is the application's name escaped
//! (`%` and every byte that is not printable ASCII or is `:` become `%XX`),
//! behind the marker `%=`; checkpoints are named `%checkpoint-0` and
//! `%checkpoint-1`. An escaped name never contains `%` followed by a
//! non-hex-digit, so neither marker can come from an application's name,
//! and descriptors of socket units (named by `FileDescriptorName=`) are told
//! apart: they stay for
//! [`Copyover::take_activated_tcp_listener`](crate::Copyover::take_activated_tcp_listener).
//!
//! Two checkpoint slots alternate: the new checkpoint is stored before the
//! previous one is removed, so a crash between the two leaves two, and the
//! newer one (by `committed_at_ns` in its header) wins.
//!
//! # Enabling
//!
//! Storing needs `NOTIFY_SOCKET` and `FileDescriptorStoreMax=` in the unit
//! (systemd 252 accepts it; without it, systemd closes what it is sent and
//! logs a warning for each). systemd 254 and later also tells the service the
//! store's size in `FDSTORE`; a positive `FDSTORE` enables the store without
//! the call.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use crate::env::{FDSTORE, NOTIFY_SOCKET};
use crate::error::Error;
use crate::handoff::Inherited;
use crate::notify::{Activated, notify, notify_with_fds};
use crate::runtime::Copyover;
use crate::snapshot::{FdKind, Manifest, Snapshot, read_sealed, write_sealed};
use crate::state::{AppState, restore};
use crate::sys;
use crate::sys::monotonic_ns;

/// The marker of a stored descriptor's name.
const STORED: &str = "%=";
/// The two checkpoint slots.
const CHECKPOINT: [&str; 2] = ["%checkpoint-0", "%checkpoint-1"];
/// systemd's limit on a descriptor name.
const FDNAME_MAX: usize = 255;

/// Whether this process stores its descriptors (process-wide, as the store
/// is the service's).
static ENABLED: AtomicBool = AtomicBool::new(false);
/// The slot the next checkpoint goes to.
static NEXT_SLOT: AtomicU8 = AtomicU8::new(0);

/// Escapes an application's descriptor name for `FDNAME=`.
fn escape(name: &str) -> String {
    let mut out = String::with_capacity(STORED.len() + name.len());
    out.push_str(STORED);
    for b in name.bytes() {
        if b == b'%' || b == b':' || !(0x20..0x7f).contains(&b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(char::from(b));
        }
    }
    out
}

/// The application's name of a stored descriptor, or `None` if `fdname` is
/// not one (a socket unit's, a checkpoint, a malformed one).
fn unescape(fdname: &str) -> Option<String> {
    let rest = fdname.strip_prefix(STORED)?;
    let bytes = rest.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = rest.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `FDSTORE=1` with `fd` under `fdname`.
fn store(fdname: &str, fd: BorrowedFd<'_>) -> Result<(), Error> {
    notify_with_fds(&format!("FDSTORE=1\nFDNAME={fdname}"), &[fd])
        .map(drop)
        .map_err(|source| Error::Setup {
            what: "store a descriptor with systemd (FDSTORE=1)",
            source,
        })
}

/// `FDSTOREREMOVE=1` of every descriptor named `fdname`.
fn remove(fdname: &str) {
    notify(&format!("FDSTOREREMOVE=1\nFDNAME={fdname}"));
}

/// What a recovered start gets back.
pub(crate) struct Recovered<S> {
    pub state: S,
    pub fds: Inherited,
    pub generation: u64,
}

/// On a first start: if systemd passed a checkpoint (a restart after a
/// crash), decodes the newest valid one and takes every stored descriptor
/// out of `activated`. Socket units' descriptors stay there.
///
/// Without a checkpoint this binary can read, the start is fresh (logged):
/// stored listeners are offered as activated ones (and stay stored), stored
/// connections are shut down and removed from the store, so that their
/// clients see the restart instead of hanging.
pub(crate) fn recover<S: AppState>(
    app: &str,
    activated: &mut Activated,
) -> Result<Option<Recovered<S>>, Error> {
    let mut checkpoints = Vec::new();
    let mut stored = Vec::new();
    for (fdname, fd) in std::mem::take(&mut activated.fds) {
        if CHECKPOINT.contains(&fdname.as_str()) {
            checkpoints.push((fdname, fd));
        } else if let Some(name) = unescape(&fdname) {
            stored.push((name, fdname, fd));
        } else {
            activated.fds.push((fdname, fd));
        }
    }
    if checkpoints.is_empty() && stored.is_empty() {
        return Ok(None);
    }
    ENABLED.store(true, Ordering::Relaxed);
    // The newest checkpoint that reads back whole and belongs to this app.
    let mut best: Option<(String, Snapshot)> = None;
    for (fdname, fd) in &checkpoints {
        match read_sealed(fd.as_fd()).and_then(|s| s.check_app(app).map(|()| s)) {
            Ok(snap) => {
                let newer = best
                    .as_ref()
                    .is_none_or(|(_, b)| snap.header.committed_at_ns > b.header.committed_at_ns);
                if newer {
                    best = Some((fdname.clone(), snap));
                }
            }
            Err(e) => {
                tracing::warn!(checkpoint = %fdname, "ignoring an unreadable checkpoint: {e}")
            }
        }
    }
    let state = match &best {
        Some((_, snap)) => {
            restore::<S>(app, snap.header.state_version, snap.payload()).map_err(|e| e.to_string())
        }
        None => Err("systemd passed stored descriptors but no readable checkpoint".into()),
    };
    let (state, (slot, snap)) = match (state, best) {
        (Ok(state), Some(best)) => (state, best),
        (Err(reason), _) => {
            tracing::warn!(
                descriptors = stored.len(),
                "cannot recover after the crash, starting fresh: {reason}"
            );
            // Listeners stay stored and are offered as activated ones;
            // connections are shut down (their clients see the restart)
            // and taken out of the store.
            for (_, fdname, fd) in stored {
                if sys::is_listening(fd.as_raw_fd()) {
                    activated.fds.push((fdname, fd));
                    continue;
                }
                remove(&fdname);
                let _ = sys::shutdown(fd.as_fd());
            }
            for (fdname, _) in &checkpoints {
                remove(fdname);
            }
            return Ok(None);
        }
        (Ok(_), None) => return Ok(None),
    };
    // The next checkpoint goes to the other slot; a stale one in it goes.
    let other = usize::from(slot == CHECKPOINT[0]);
    NEXT_SLOT.store(other as u8, Ordering::Relaxed);
    remove(CHECKPOINT[other]);
    drop(checkpoints);

    // The stored descriptors become an inherited set, as after an upgrade;
    // each one's kind is read from the descriptor itself.
    let mut seen = std::collections::HashSet::new();
    let mut owned = Vec::with_capacity(stored.len());
    for (name, _, fd) in stored {
        if !seen.insert(name.clone()) {
            tracing::warn!(name = %name, "systemd passed two descriptors of this name; closing one");
            continue;
        }
        let kind = stored_kind(fd.as_raw_fd());
        owned.push((name, fd, kind));
    }
    let fds = Inherited::from_owned(owned);
    let h = &snap.header;
    let age_ms = monotonic_ns().saturating_sub(h.committed_at_ns) as f64 / 1e6;
    tracing::warn!(
        generation = h.generation,
        version = %h.writer_version,
        checkpoint_age_ms = age_ms,
        descriptors = fds.len(),
        "recovered after a crash: the last checkpoint and every stored descriptor"
    );
    Ok(Some(Recovered {
        state,
        fds,
        generation: h.generation,
    }))
}

/// The kind of a descriptor systemd passed back, read from the descriptor
/// itself: a listening or connected stream socket, a datagram socket (UDP,
/// Unix datagram), or anything else.
fn stored_kind(fd: std::os::fd::RawFd) -> FdKind {
    match sys::socket_type(fd) {
        Ok(libc::SOCK_STREAM) if sys::is_listening(fd) => FdKind::Listener,
        Ok(libc::SOCK_STREAM) => FdKind::Stream,
        Ok(libc::SOCK_DGRAM) => FdKind::Datagram,
        _ => FdKind::Other,
    }
}

impl<S> Copyover<S> {
    /// Keeps descriptors in systemd's file descriptor store from now on, so
    /// that a crash loses no connection (see the [module docs](crate::fdstore)).
    /// Returns whether the store is in use: it needs `NOTIFY_SOCKET` (a
    /// systemd service) and `FileDescriptorStoreMax=` in the unit. Already on
    /// after a recovered start, or when systemd says `FDSTORE=` (254+).
    pub fn enable_fdstore(&mut self) -> bool {
        let on = std::env::var_os(NOTIFY_SOCKET).is_some();
        ENABLED.store(on, Ordering::Relaxed);
        on
    }

    /// Whether descriptors go to systemd's store (see
    /// [`enable_fdstore`](Self::enable_fdstore)).
    pub fn fdstore_enabled(&self) -> bool {
        // systemd 254+ says the store's size; read once, not per call.
        static FROM_ENV: OnceLock<bool> = OnceLock::new();
        ENABLED.load(Ordering::Relaxed)
            || *FROM_ENV.get_or_init(|| {
                std::env::var(FDSTORE).is_ok_and(|n| n.parse::<u32>().is_ok_and(|n| n > 0))
                    && std::env::var_os(NOTIFY_SOCKET).is_some()
            })
    }

    /// Stores a listener or a connection with systemd under `name` (the name
    /// it comes back under after a crash). Store each descriptor once, when
    /// it is opened; a no-op unless the store is enabled.
    ///
    /// # Errors
    ///
    /// [`Error::Setup`] if the name is longer than systemd allows (255
    /// bytes, escaped) or the notification cannot be sent; serving goes on,
    /// only this descriptor would not survive a crash.
    pub fn store_fd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), Error> {
        if !self.fdstore_enabled() {
            return Ok(());
        }
        let fdname = escape(name);
        if fdname.len() > FDNAME_MAX {
            return Err(Error::Setup {
                what: "store a descriptor with systemd (its escaped name is over 255 bytes)",
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        store(&fdname, fd)
    }

    /// Removes `name` from systemd's store. Call it when the application
    /// closes that descriptor: while systemd holds a copy, closing ours does
    /// not close the connection (shutting it down does). A no-op unless the
    /// store is enabled; failures are logged at debug level.
    pub fn unstore_fd(&self, name: &str) {
        if self.fdstore_enabled() {
            remove(&escape(name));
        }
    }

    /// Replaces the checkpoint in systemd's store with `state`: written in
    /// the snapshot format (app, state version, writer's version, generation)
    /// to a new sealed memfd. After a crash, [`boot`](crate::boot) resumes
    /// from the newest checkpoint. A no-op unless the store is enabled.
    ///
    /// Call it after the state changed in a way worth keeping (after each
    /// batch of events, or every second): what changed after the last
    /// checkpoint is lost in a crash.
    ///
    /// # Errors
    ///
    /// [`Error::Snapshot`] if the state cannot be encoded or the memfd
    /// cannot be written, [`Error::Setup`] if systemd cannot be told. The
    /// previous checkpoint stays in the store.
    pub fn checkpoint(&self, state: &S) -> Result<(), Error>
    where
        S: AppState,
    {
        if !self.fdstore_enabled() {
            return Ok(());
        }
        let mut header = self.header(monotonic_ns());
        header.state_version = S::VERSION;
        let payload = crate::snapshot::encode_state(state)?;
        let memfd: OwnedFd = write_sealed(&header, &Manifest::default(), &payload)?;
        let slot = usize::from(NEXT_SLOT.load(Ordering::Relaxed) & 1);
        store(CHECKPOINT[slot], memfd.as_fd())?;
        remove(CHECKPOINT[1 - slot]);
        NEXT_SLOT.store(1 - slot as u8, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_never_look_like_a_checkpoint() {
        for name in [
            "conn:17",
            "listener:telnet",
            "100%",
            "a b",
            "é",
            "%checkpoint-0",
            "",
        ] {
            let fdname = escape(name);
            assert!(!fdname.contains(':'), "{fdname}");
            assert!(
                fdname.bytes().all(|b| (0x20..0x7f).contains(&b)),
                "{fdname}"
            );
            assert!(!CHECKPOINT.contains(&fdname.as_str()));
            assert_eq!(unescape(&fdname).as_deref(), Some(name));
        }
        assert_eq!(escape("conn:17"), "%=conn%3A17");
    }

    #[test]
    fn socket_unit_names_and_garbage_are_not_stored_names() {
        for fdname in ["telnet", "stored", "%checkpoint-1", "%=bad%zz", "%=cut%4"] {
            assert_eq!(unescape(fdname), None, "{fdname}");
        }
    }
}
