//! The newcomer's side of a migration: `boot` receives the snapshot and
//! the descriptors, `ready` waits for the old process's `go` (see the
//! [sequence](super)).

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use super::{
    FAIL, FDS, GO, HELLO, JOINED, MAX_MESSAGE, MigrateVar, OK_MIGRATE, PROBE, READY, SHARE,
    SNAPSHOT,
};
use crate::error::Error;
use crate::handoff::Inherited;
use crate::runtime::{Config, Copyover, Start, open_own_binary};
use crate::snapshot::{Header, read_sealed};
use crate::state::{AppState, restore};
use crate::sys::{self, Claims, monotonic_ns};

/// The old process closed the socket before handing anything over.
const CLOSED: &str = "the old process closed the migration socket before handing over (it refused this process or the state: see its log)";

/// What the newcomer keeps of the migration until it is ready.
#[derive(Debug)]
pub(crate) struct Arrival {
    /// Its end of the socket pair.
    sock: OwnedFd,
    /// The old process, as a pidfd it sent with the snapshot.
    old: OwnedFd,
    /// The old process's PID, and its process group (this process joins
    /// it once it serves).
    pub(crate) from: u32,
    group: Option<i32>,
    /// The old process started this one itself (no forking wrapper).
    child_of_old: bool,
    pub(crate) header: Header,
    pub(crate) boot_ns: u64,
    /// When the last descriptor came.
    pub(crate) received_ns: u64,
    pub(crate) restored_ns: u64,
}

/// How the old process answered `ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// `go`: it handed over and exits.
    Go,
    /// No answer, and it is gone (killed after the hand-over, say): this
    /// process serves, since nobody else will.
    Gone,
    /// No answer, and it lives: it kept its clients (it gave up on this
    /// process, which it could not kill). This process must not serve.
    Kept,
    /// `share`: a gradual migration; both processes serve, and users move
    /// here a batch at a time.
    Share,
}

impl Arrival {
    /// Says `ready` and waits for the old process's answer (see [`Answer`]).
    /// The old process answers within its own deadline or kills this one:
    /// no deadline here, but a second for a socket's end to be followed by
    /// the old process's exit (it closes its descriptors as it exits).
    pub(crate) fn confirm(&self) -> Answer {
        let answered = sys::send_message(self.sock.as_fd(), READY, &[]).and_then(|()| {
            let mut buf = [0u8; 16];
            let mut fds = Vec::new();
            // A passing error (nothing taken off the socket) is tried again,
            // for a second: only the answer, or the socket's end, decides.
            let mut tries = 0;
            let n = loop {
                match sys::recv_message(self.sock.as_fd(), &mut buf, &mut fds) {
                    Err(e) if e.kind() != std::io::ErrorKind::ConnectionReset && tries < 50 => {
                        tries += 1;
                        tracing::debug!("waiting for the old process's answer: {e}; again");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    other => break other?,
                }
            };
            Ok(match &buf[..n] {
                m if m == GO => Some(Answer::Go),
                m if m == SHARE => Some(Answer::Share),
                _ => None,
            })
        });
        if let Ok(Some(answer)) = answered {
            return answer;
        }
        if self.old_is_gone(Duration::from_secs(5)) {
            tracing::warn!(
                from = self.from,
                ?answered,
                "process {} ended without handing over for good; serving its clients",
                self.from
            );
            Answer::Gone
        } else {
            tracing::error!(
                from = self.from,
                ?answered,
                "process {} kept its clients without answering; this process must not serve them",
                self.from
            );
            Answer::Kept
        }
    }

    /// Whether the old process is gone, after the socket ended without
    /// `go`: its pidfd becomes readable as it exits (the socket closes a
    /// moment before, as its descriptors do). Asked for five seconds (a
    /// poll that fails is asked again): only an old process seen alive all
    /// that time has kept its clients. If the pidfd never answered, a
    /// parent that was the old process and no longer is says it is gone.
    pub(super) fn old_is_gone(&self, limit: Duration) -> bool {
        let until = std::time::Instant::now() + limit;
        let mut answered = false;
        while std::time::Instant::now() < until {
            match sys::wait_readable(self.old.as_fd(), Duration::from_millis(100)) {
                Ok(true) => return true,
                Ok(false) => answered = true,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        !answered && self.child_of_old && std::os::unix::process::parent_id() != self.from
    }

    /// The old process, as a pidfd.
    pub(super) fn old_pidfd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.old.as_fd()
    }

    /// A descriptor of the old process's pidfd of its own, if one can be
    /// made.
    pub(crate) fn old_pidfd_owned(&self) -> Option<OwnedFd> {
        self.old.try_clone().ok()
    }

    /// A second descriptor of the socket to the old process, for the link
    /// of a gradual migration.
    pub(super) fn link_socket(&self) -> std::io::Result<OwnedFd> {
        self.sock.try_clone()
    }

    /// Once this process serves: into the old process's process group, so
    /// that a terminal's job control (Ctrl-C), or a supervisor that signals
    /// the group, reaches the server as it reached the old one (the new
    /// process was started in a group of its own, for the old one to kill
    /// on a failure); then says `joined`.
    pub(crate) fn join_old_group(&self) {
        if let Some(group) = self.group
            && let Err(e) = sys::join_process_group(group)
        {
            tracing::warn!(
                group,
                "could not join the old process's process group ({e}): signals to that group miss this process"
            );
        }
        // The old process waits for this before it exits (its exit could
        // take the group with it).
        let _ = sys::send_message(self.sock.as_fd(), JOINED, &[]);
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
    let group = sys::process_group_of(var.from as i32).ok();
    arrive_on::<S>(config, argv, var, boot_ns, sock, group)
}

/// An external newcomer in `boot` (`COPYOVER_JOIN=PATH`): connects to the
/// old process's migration socket at `path`, and takes over as a child
/// newcomer does, after answering the old process's probe. It stays in its
/// own process group (the old one's may be in another session).
pub(crate) fn join<S: AppState>(
    config: Config,
    argv: Vec<CString>,
    path: &std::path::Path,
    boot_ns: u64,
) -> Result<(Copyover<S>, Start<S>), Error> {
    // `PID.migration`: the old process, as its own namespace numbers it.
    let named = path
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let refused = |reason: String| Error::Arrival {
        from: named,
        reason,
    };
    let sock = sys::seqpacket_connect(path).map_err(|e| {
        refused(format!(
            "could not connect to the migration socket {} ({e}): is the old process running with Config::migration_socket, and is the path reachable from here?",
            path.display()
        ))
    })?;
    let (from, uid, _) = sys::peer_credentials(sock.as_fd()).map_err(|e| {
        refused(format!(
            "could not learn who listens at {}: {e}",
            path.display()
        ))
    })?;
    // Whoever listens there hands over state and descriptors: only this
    // process's own user or root (a directory another user made at a
    // predictable path could hold a socket of theirs).
    let own = sys::effective_uid();
    if uid != own && uid != 0 {
        return Err(refused(format!(
            "the process listening at {} runs as uid {uid}, neither this process's uid {own} nor root: nothing is taken from it",
            path.display()
        )));
    }
    let var = MigrateVar {
        socket: std::os::fd::AsRawFd::as_raw_fd(&sock),
        // 0: it is in a PID namespace this one cannot see.
        from: if from == 0 { named } else { from },
    };
    arrive_on::<S>(config, argv, var, boot_ns, sock, None)
}

fn arrive_on<S: AppState>(
    config: Config,
    argv: Vec<CString>,
    var: MigrateVar,
    boot_ns: u64,
    sock: OwnedFd,
    group: Option<i32>,
) -> Result<(Copyover<S>, Start<S>), Error> {
    let mut sock = sock;
    let result = take_over::<S>(config, argv, var, &mut sock);
    match result {
        Ok((mut co, start, parts)) => {
            co.arrival = Some(Arrival {
                sock,
                old: parts.old,
                from: var.from,
                group,
                child_of_old: std::os::unix::process::parent_id() == var.from,
                header: parts.header,
                boot_ns,
                received_ns: parts.received_ns,
                restored_ns: monotonic_ns(),
            });
            co.migrated_from = Some(var.from);
            co.fds_renumbered = !parts.kept;
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
    old: OwnedFd,
    received_ns: u64,
    /// Every descriptor is at the number it had in the old process.
    kept: bool,
}

fn take_over<S: AppState>(
    config: Config,
    argv: Vec<CString>,
    var: MigrateVar,
    sock: &mut OwnedFd,
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
    // In `boot`, checked: the old process may commit now.
    sys::send_message(sock.as_fd(), HELLO, &[]).map_err(|e| {
        refused(match e.raw_os_error() {
            // It closed the connection at once (a refusal at its door).
            Some(libc::EPIPE | libc::ECONNRESET) => CLOSED.into(),
            _ => format!("could not say hello to the old process: {e}"),
        })
    })?;
    // An external newcomer is probed first: the snapshot without its
    // descriptors, checked as a probed binary checks it.
    let probe = |memfd: &OwnedFd| -> Result<(), String> {
        let snap = read_sealed(memfd.as_fd()).map_err(|e| e.to_string())?;
        snap.check_app(&config.app).map_err(|e| e.to_string())?;
        restore::<S>(&config.app, snap.header.state_version, snap.payload())
            .map(drop)
            .map_err(|e| e.to_string())
    };
    let (mut snapshot, mut old, fds) = receive(sock.as_fd(), &probe).map_err(refused)?;
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
    // At the numbers they had, where those are free (see `numbers`).
    let targets: Vec<std::os::fd::RawFd> = manifest.fds().collect();
    let (fds, kept) =
        super::numbers::keep_numbers(fds, &targets, &mut [sock, &mut snapshot, &mut old]);
    if !kept {
        tracing::warn!(
            "some descriptors could not get the numbers they had in process {}: an epoll instance kept in the handoff does not work here (see Copyover::fds_kept_numbers)",
            var.from
        );
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
            old,
            received_ns,
            kept,
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
fn receive(
    sock: std::os::fd::BorrowedFd<'_>,
    probe: &dyn Fn(&OwnedFd) -> Result<(), String>,
) -> Result<(OwnedFd, OwnedFd, Vec<OwnedFd>), String> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut first = Vec::with_capacity(1);
    let mut n = match sys::recv_message(sock, &mut buf, &mut first) {
        // It closed with our `hello` unread.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Err(CLOSED.into()),
        other => other.map_err(|e| format!("could not receive the snapshot: {e}"))?,
    };
    if &buf[..n] == PROBE {
        let Ok([memfd]) = <[OwnedFd; 1]>::try_from(std::mem::take(&mut first)) else {
            return Err("the probe came without its snapshot".into());
        };
        probe(&memfd).map_err(|e| format!("the probe's snapshot: {e}"))?;
        let answer = format!("{OK_MIGRATE}{}", env!("CARGO_PKG_VERSION"));
        sys::send_message(sock, answer.as_bytes(), &[])
            .map_err(|e| format!("could not answer the probe: {e}"))?;
        n = sys::recv_message(sock, &mut buf, &mut first)
            .map_err(|e| format!("could not receive the snapshot: {e}"))?;
    }
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    if n == 0 {
        return Err(CLOSED.into());
    }
    if let Some(reason) = text.strip_prefix(FAIL) {
        return Err(format!(
            "the old process turned this process away: {reason}"
        ));
    }
    let count: usize = text
        .strip_prefix(SNAPSHOT)
        .and_then(|rest| rest.strip_prefix(' '))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("the first message is {text:?}, not `{SNAPSHOT} COUNT`"))?;
    // The snapshot, and a pidfd of the old process.
    let (snapshot, old) = match <[OwnedFd; 2]>::try_from(first) {
        Ok([snapshot, old]) => (snapshot, old),
        Err(_) => {
            return Err(
                "the first message did not carry exactly the snapshot and the old process".into(),
            );
        }
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
    Ok((snapshot, old, fds))
}
