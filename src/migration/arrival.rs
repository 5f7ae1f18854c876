//! The newcomer's side of a migration: `boot` receives the snapshot and
//! the descriptors, `ready` waits for the old process's `go` (see the
//! [sequence](super)).

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};

use super::{FAIL, FDS, GO, HELLO, MAX_MESSAGE, MigrateVar, READY, SNAPSHOT};
use crate::error::Error;
use crate::handoff::Inherited;
use crate::runtime::{Config, Copyover, Start, open_own_binary};
use crate::snapshot::{Header, read_sealed};
use crate::state::{AppState, restore};
use crate::sys::{self, Claims, monotonic_ns};

/// What the newcomer keeps of the migration until it is ready.
#[derive(Debug)]
pub(crate) struct Arrival {
    /// Its end of the socket pair.
    sock: OwnedFd,
    /// The old process.
    pub(crate) from: u32,
    pub(crate) header: Header,
    pub(crate) boot_ns: u64,
    /// When the last descriptor came.
    pub(crate) received_ns: u64,
    pub(crate) restored_ns: u64,
}

impl Arrival {
    /// Says `ready` and waits for the old process's `go`. `true`: it handed
    /// over and exits; `false`: it is gone without an answer (killed after
    /// the hand-over, say), and this process serves, since nobody else
    /// will. The old process answers within its own deadline or kills this
    /// one: no deadline here.
    pub(crate) fn confirm(&self) -> bool {
        if let Err(e) = sys::send_message(self.sock.as_fd(), READY, &[]) {
            tracing::warn!(
                from = self.from,
                "process {} ended without handing over for good (telling it this one is ready: {e}); serving its clients",
                self.from
            );
            return false;
        }
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        match sys::recv_message(self.sock.as_fd(), &mut buf, &mut fds) {
            Ok(n) if &buf[..n] == GO => true,
            answer => {
                tracing::warn!(
                    from = self.from,
                    ?answer,
                    "process {} ended without handing over for good; serving its clients",
                    self.from
                );
                false
            }
        }
    }
}

/// A migration's newcomer in `boot`: receives everything, restores the
/// state, and returns a handle whose `ready` finishes the migration. An
/// error is also said to the old process (`fail REASON`), which serves on.
pub(crate) fn arrive<S: AppState>(
    config: Config,
    argv: Vec<CString>,
    var: MigrateVar,
    boot_ns: u64,
    claims: &Claims,
) -> Result<(Copyover<S>, Start<S>), Error> {
    let refused = |reason: String| Error::Arrival {
        from: var.from,
        reason,
    };
    let sock = claims.inherit(var.socket).map_err(|e| {
        refused(format!(
            "fd {} is not the migration socket: {e}",
            var.socket
        ))
    })?;
    if sys::socket_type(var.socket).ok() != Some(libc::SOCK_SEQPACKET) {
        return Err(refused(format!(
            "fd {} is not the migration socket (not a SOCK_SEQPACKET socket)",
            var.socket
        )));
    }
    // In `boot`: the old process may commit now.
    let _ = sys::send_message(sock.as_fd(), HELLO, &[]);
    let result = take_over::<S>(config, argv, var, sock.as_fd());
    match result {
        Ok((mut co, start, parts)) => {
            co.arrival = Some(Arrival {
                sock,
                from: var.from,
                header: parts.header,
                boot_ns,
                received_ns: parts.received_ns,
                restored_ns: monotonic_ns(),
            });
            co.migrated_from = Some(var.from);
            Ok((co, start))
        }
        Err(e) => {
            let why = match &e {
                Error::Arrival { reason, .. } => reason.clone(),
                other => other.to_string(),
            };
            let text = format!("{FAIL}{why}");
            let mut bytes = text.into_bytes();
            bytes.truncate(MAX_MESSAGE);
            let _ = sys::send_message(sock.as_fd(), &bytes, &[]);
            Err(e)
        }
    }
}

/// What `take_over` learnt besides the handle and the start.
struct Parts {
    header: Header,
    received_ns: u64,
}

fn take_over<S: AppState>(
    config: Config,
    argv: Vec<CString>,
    var: MigrateVar,
    sock: std::os::fd::BorrowedFd<'_>,
) -> Result<(Copyover<S>, Start<S>, Parts), Error> {
    let refused = |reason: String| Error::Arrival {
        from: var.from,
        reason,
    };
    crate::resume::single_thread()?;
    name_after_binary();
    crate::env::forget_handoff_vars();
    crate::notify::Activated::from_env_ignored();
    // Everything this process inherited (the socket among them) and
    // everything it receives is close-on-exec from here on.
    sys::cloexec_from(3).map_err(|source| Error::Setup {
        what: "set close-on-exec on the inherited fds",
        source,
    })?;
    let (snapshot, fds) = receive(sock).map_err(refused)?;
    let received_ns = monotonic_ns();
    let mut snap = read_sealed(snapshot.as_fd())
        .and_then(|snap| snap.check_app(&config.app).map(|()| snap))?;
    let manifest = std::mem::take(&mut snap.manifest);
    if manifest.len() != fds.len() {
        return Err(refused(format!(
            "the snapshot names {} descriptors but {} came",
            manifest.len(),
            fds.len()
        )));
    }
    let fds = Inherited::received(manifest, fds)?;
    let state = restore::<S>(&config.app, snap.header.state_version, snap.payload())?;
    let header = snap.header.clone();
    drop(snap);
    drop(snapshot);
    let worker = crate::resume::start_worker()?;
    let requests = crate::resume::install_requests()?;
    let mut co = Copyover::new(config, argv, requests, worker);
    co.generation = header.generation + 1;
    if co.config.binary.is_none() {
        co.binary = header.binary.clone();
    }
    co.own_binary = Some(open_own_binary()?);
    if header.state_version != S::VERSION {
        tracing::info!(
            from = header.state_version,
            to = S::VERSION,
            "migrated the state"
        );
    }
    Ok((
        co,
        Start::Resumed { state, fds },
        Parts {
            header,
            received_ns,
        },
    ))
}

/// The old process started this one from a descriptor
/// (`/proc/self/fd/N`), which the kernel takes for its name (`ps` would
/// show `N`): it gets its binary's file name back, as an exec of the path
/// (or an in-place upgrade) gives it. Only a name: a failure is ignored.
fn name_after_binary() {
    use std::os::unix::ffi::OsStrExt;
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return;
    };
    let Some(base) = exe.file_name() else { return };
    let bytes = &base.as_bytes()[..base.len().min(15)];
    if let Ok(name) = CString::new(bytes) {
        let _ = sys::set_thread_name(&name);
    }
}

/// Receives the snapshot and every descriptor: `snapshot 1 COUNT` with the
/// memfd, then `fds` batches until COUNT came.
fn receive(sock: std::os::fd::BorrowedFd<'_>) -> Result<(OwnedFd, Vec<OwnedFd>), String> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut first = Vec::with_capacity(1);
    let n = sys::recv_message(sock, &mut buf, &mut first)
        .map_err(|e| format!("could not receive the snapshot: {e}"))?;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    if n == 0 {
        return Err("the old process closed the migration socket before handing over".into());
    }
    let count: usize = text
        .strip_prefix(SNAPSHOT)
        .and_then(|rest| rest.strip_prefix(' '))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("the first message is {text:?}, not `{SNAPSHOT} COUNT`"))?;
    let snapshot = match (first.pop(), first.is_empty()) {
        (Some(fd), true) => fd,
        _ => return Err("the first message did not carry exactly the snapshot".into()),
    };
    let mut fds = Vec::with_capacity(count);
    while fds.len() < count {
        let n = sys::recv_message(sock, &mut buf, &mut fds).map_err(|e| {
            format!(
                "could not receive the descriptors ({} of {count} came): {e}",
                fds.len()
            )
        })?;
        match &buf[..n] {
            [] => {
                return Err(format!(
                    "the old process closed the migration socket after {} of {count} descriptors",
                    fds.len()
                ));
            }
            m if m == FDS => {}
            m => {
                return Err(format!(
                    "unexpected message {:?}",
                    String::from_utf8_lossy(m)
                ));
            }
        }
    }
    if fds.len() != count {
        return Err(format!("{} descriptors came, not {count}", fds.len()));
    }
    Ok((snapshot, fds))
}
