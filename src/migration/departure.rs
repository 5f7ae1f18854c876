//! The old process's side of a migration: the newcomer started after the
//! probe, and the hand-over at the commit (see the [sequence](super)).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{FAIL, FDS, GO, HELLO, MAX_MESSAGE, MigrateVar, READY, SNAPSHOT};
use crate::env::{MIGRATE_VAR, clean_env};
use crate::error::UpgradeError;
use crate::signal::Requests;
use crate::snapshot::{Draft, Header, Manifest};
use crate::status::{Outcome, Reporter};
use crate::sys;
use crate::upgrade::probe::{Executable, command, describe};
use crate::worker::Worker;

/// The new process, started and waiting in its `boot` for the hand-over.
/// Dropped before it took over (a refusal, an abandon, a failed commit, a
/// shutdown), it is killed and reaped: it never served anyone.
#[derive(Debug)]
pub(crate) struct Newcomer {
    child: Child,
    /// Our end of the socket pair.
    sock: OwnedFd,
    started: Instant,
    /// It said `hello`: it is in its `boot`, waiting for the commit.
    greeted: bool,
}

impl Newcomer {
    /// Starts the new binary (the probed descriptor) with this process's
    /// arguments and environment, plus `COPYOVER_MIGRATE` naming its end of
    /// a fresh socket pair, which it alone inherits. In this process's
    /// process group, with its standard streams: it is the server to be.
    pub(crate) fn start(exe: &Executable, argv: &[CString]) -> io::Result<Newcomer> {
        let (ours, theirs) = sys::seqpacket_pair()?;
        let var = MigrateVar {
            socket: theirs.as_raw_fd(),
            from: std::process::id(),
        };
        let mut cmd = command(exe, argv, &clean_env());
        sys::keep_fd_in_child(&mut cmd, theirs.as_raw_fd());
        cmd.env(MIGRATE_VAR, var.format());
        let child = cmd.spawn()?;
        // Only the child holds the other end now: its exit ends the socket.
        drop(theirs);
        Ok(Newcomer {
            child,
            sock: ours,
            started: Instant::now(),
            greeted: false,
        })
    }

    /// Has the helper thread wake the event loop (`wake`) when the newcomer
    /// says `hello` or ends, or after `limit`: then [`greeting`](Self::greeting)
    /// tells which.
    pub(crate) fn watch(
        &self,
        worker: &Worker,
        wake: Arc<OwnedFd>,
        limit: Duration,
    ) -> io::Result<()> {
        let sock = self.sock.try_clone()?;
        worker.run(move || {
            let until = Instant::now() + limit;
            while Instant::now() < until {
                let left = until.saturating_duration_since(Instant::now());
                if !matches!(sys::wait_readable(sock.as_fd(), left), Ok(false)) {
                    break;
                }
            }
            crate::signal::wake(&wake);
        })
    }

    /// Whether it reached its `boot` (it said `hello`): `Ok(false)` not
    /// yet; an error if it ended, said something else, or took more than
    /// `limit` from its start.
    pub(crate) fn greeting(&mut self, limit: Duration) -> Result<bool, String> {
        if self.greeted {
            return Ok(true);
        }
        if !sys::wait_readable(self.sock.as_fd(), Duration::ZERO).map_err(|e| e.to_string())? {
            if self.started.elapsed() > limit {
                return Err(format!(
                    "it did not reach copyover::boot within {} ms (Config::probe_timeout)",
                    limit.as_millis()
                ));
            }
            return Ok(false);
        }
        let message = self.read_message().unwrap_or_default();
        match message.as_slice() {
            [] => Err(self.how_it_ended()),
            m if m == HELLO => {
                self.greeted = true;
                Ok(true)
            }
            m => Err(answer_error(m)),
        }
    }

    /// Whether it said `hello` (see [`greeting`](Self::greeting)).
    pub(crate) fn greeted(&self) -> bool {
        self.greeted
    }

    /// Its PID.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one message, retrying while the kernel refuses more
    /// descriptors in flight (`ETOOMANYREFS`: this user's in-flight count
    /// is held to the sender's `RLIMIT_NOFILE`; the newcomer is draining
    /// them), until `deadline`.
    fn send(&self, message: &[u8], fds: &[RawFd], deadline: Instant) -> io::Result<()> {
        loop {
            match sys::send_message(self.sock.as_fd(), message, fds) {
                Err(e) if e.raw_os_error() == Some(libc::ETOOMANYREFS) => {
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "it did not take the descriptors in time",
                    ));
                }
                done => return done,
            }
        }
    }

    /// Waits for `ready` until `deadline`; says why not otherwise.
    fn wait_ready(&mut self, deadline: Instant, timeout: Duration) -> Result<(), String> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "it was not ready within {} ms of the commit (Config::ready_timeout of this process)",
                    timeout.as_millis()
                ));
            }
            match sys::wait_readable(self.sock.as_fd(), left.min(Duration::from_secs(1))) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => return Err(format!("could not wait for it: {e}")),
            }
            let message = match self.read_message() {
                Ok(m) => m,
                Err(e) => return Err(format!("could not read its answer: {e}")),
            };
            return match message.as_slice() {
                [] => Err(self.how_it_ended()),
                m if m == READY => Ok(()),
                m => Err(answer_error(m)),
            };
        }
    }

    /// A message waiting to be read, in words: a newcomer that cannot take
    /// what it is sent says why (`fail REASON`) and exits while the sending
    /// goes on.
    fn last_word(&self) -> Option<String> {
        if !matches!(
            sys::wait_readable(self.sock.as_fd(), Duration::ZERO),
            Ok(true)
        ) {
            return None;
        }
        let message = self.read_message().ok()?;
        (!message.is_empty()).then(|| answer_error(&message))
    }

    /// Reads one message (empty: the socket's end). A newcomer that exits
    /// with messages of ours unread leaves `ECONNRESET` on our end, which
    /// the kernel reports once, before the messages it sent: read past it.
    fn read_message(&self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut fds = Vec::new();
        let read =
            |buf: &mut [u8], fds: &mut Vec<OwnedFd>| sys::recv_message(self.sock.as_fd(), buf, fds);
        let n = match read(&mut buf, &mut fds) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                match sys::wait_readable(self.sock.as_fd(), Duration::ZERO) {
                    Ok(true) => read(&mut buf, &mut fds).or(Ok(0)),
                    _ => Ok(0),
                }
            }
            other => other,
        }?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Why the socket ended: the newcomer's exit status, once it is reaped
    /// (its socket closes as it exits; it is given a second to finish).
    fn how_it_ended(&mut self) -> String {
        let until = Instant::now() + Duration::from_secs(1);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    return format!("it ended before it was ready: {}", describe(status));
                }
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(1)),
                Ok(None) => return "it closed the migration socket before it was ready".into(),
                Err(e) => return format!("it ended before it was ready (its status: {e})"),
            }
        }
    }
}

/// A `fail REASON`, or a message that has no place here, in words.
fn answer_error(m: &[u8]) -> String {
    match m.strip_prefix(FAIL.as_bytes()) {
        Some(reason) => format!("it refused: {}", String::from_utf8_lossy(reason)),
        None => format!(
            "it sent {:?}, not a migration answer",
            String::from_utf8_lossy(m)
        ),
    }
}

impl Drop for Newcomer {
    fn drop(&mut self) {
        // Never reused before the reap: a child's PID is ours until then.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the hand-over needs from the runtime.
pub(crate) struct HandOver<'a> {
    pub header: Header,
    pub manifest: &'a Manifest,
    pub newcomer: Newcomer,
    /// The memfd the probe prepared, if it could.
    pub draft: Option<Draft>,
    pub payload_hint: usize,
    pub requests: &'a Requests,
    /// How long the newcomer has from the commit to `ready`.
    pub ready_timeout: Duration,
    /// Who this process is, for its last outcome.
    pub reporter: Reporter,
}

/// Seals the state, hands it and every kept descriptor to the newcomer,
/// waits for its `ready`, and exits. Returns only if the newcomer did not
/// take over: it is killed then, and this process serves on with
/// everything it had (it closed nothing).
pub(crate) fn hand_over<S: serde::Serialize>(state: &S, h: HandOver<'_>) -> UpgradeError {
    let HandOver {
        header,
        manifest,
        mut newcomer,
        draft,
        payload_hint,
        requests,
        ready_timeout,
        reporter,
    } = h;
    let pid = newcomer.pid();
    let failed = |reason: String| UpgradeError::Migration { pid, reason };
    let deadline = Instant::now() + ready_timeout;
    let draft = draft.map_or_else(|| Draft::new(0), Ok);
    let memfd = match draft.and_then(|d| d.seal_state(&header, manifest, state, payload_hint)) {
        Ok((memfd, _)) => memfd,
        Err(e) => return e.into(),
    };
    // A newcomer that stops reading must not hold this process past its
    // deadline.
    if let Err(e) = sys::set_send_timeout(newcomer.sock.as_fd(), ready_timeout) {
        return UpgradeError::Io {
            what: "set the migration socket's send timeout",
            source: e,
        };
    }
    let fds: Vec<RawFd> = manifest.fds().collect();
    let first = format!("{SNAPSHOT} {}", fds.len());
    let sent = newcomer
        .send(first.as_bytes(), &[memfd.as_raw_fd()], deadline)
        .and_then(|()| {
            fds.chunks(sys::MAX_FDS_PER_MESSAGE)
                .try_for_each(|batch| newcomer.send(FDS, batch, deadline))
        });
    drop(memfd);
    if let Err(e) = sent {
        // Its `fail REASON`, if it said why before it went away.
        let ended = match (newcomer.last_word(), e.raw_os_error()) {
            (Some(said), _) => said,
            (None, Some(libc::EPIPE | libc::ECONNRESET)) => newcomer.how_it_ended(),
            (None, _) => format!("the hand-over failed: {e}"),
        };
        return failed(ended);
    }
    tracing::debug!(
        newcomer = pid,
        fds = fds.len(),
        "handed over; waiting for the new process"
    );
    if let Err(reason) = newcomer.wait_ready(deadline, ready_timeout) {
        return failed(reason);
    }
    // A shutdown asked of this process meanwhile: the newcomer is killed,
    // not left to serve what the operator wanted stopped.
    if requests.shutdown.load(std::sync::atomic::Ordering::SeqCst) {
        return UpgradeError::Shutdown;
    }
    // The point of no return: from `go` on, the newcomer serves.
    if let Err(e) = newcomer.send(GO, &[], deadline) {
        return failed(format!("it went away as it became ready ({e})"));
    }
    leave(newcomer, requests, &reporter)
}

/// After `go`: requests that came meanwhile go to the newcomer, the status
/// file (and systemd's status line) says where the server went, and this
/// process exits (the newcomer tells systemd it is the main process) (no destructor runs: every descriptor is the newcomer's
/// now, and closing this process's copies changes nothing for it).
fn leave(newcomer: Newcomer, requests: &Requests, reporter: &Reporter) -> ! {
    let pid = newcomer.pid();
    for (flag, sig) in [
        (&requests.upgrade, libc::SIGHUP),
        (&requests.migrate, libc::SIGUSR2),
        (&requests.save, libc::SIGUSR1),
    ] {
        if crate::signal::take(flag) {
            let _ = sys::signal_child(pid as i32, sig);
        }
    }
    crate::status::report(Outcome::Migrated { to: pid }, reporter);
    // Not killed, not reaped: it outlives this process.
    std::mem::forget(newcomer);
    std::process::exit(0)
}
