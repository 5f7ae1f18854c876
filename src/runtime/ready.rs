//! `ready`: the end of an upgrade or a rollback in the new image (the
//! readiness claim, the holder's end, the outcome).

use super::*;

use std::sync::atomic::{AtomicBool, Ordering};

/// Set when this image calls `ready`, never cleared. A TLS session restored
/// from the handoff (`crate::tls`) seals and opens no record before it: a
/// rollback then finds the peer at the sequence numbers the untouched
/// snapshot holds, and no nonce is used twice.
static IMAGE_READY: AtomicBool = AtomicBool::new(false);

#[cfg(all(test, feature = "tls"))]
thread_local! {
    /// Unit tests: the image counts as ready on this test's thread (tests
    /// run in parallel threads of one process that never calls `ready`).
    pub(crate) static READY_IN_THIS_TEST: std::cell::Cell<bool> =
        const { std::cell::Cell::new(false) };
}

/// Whether this image has called [`Copyover::ready`].
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
pub(crate) fn image_is_ready() -> bool {
    #[cfg(all(test, feature = "tls"))]
    if READY_IN_THIS_TEST.with(|r| r.get()) {
        return true;
    }
    IMAGE_READY.load(Ordering::Acquire)
}

/// What the new image keeps of the handoff until it is ready.
#[derive(Debug)]
pub(crate) struct Resume {
    pub(crate) mode: Mode,
    pub(crate) header: Header,
    pub(crate) snapshot: OwnedFd,
    pub(crate) old_binary: OwnedFd,
    /// How the old image ran, for a rollback (see `upgrade::record`).
    pub(crate) exec_record: Option<OwnedFd>,
    /// A pidfd of the holder after a rollback (after an upgrade, the
    /// rollback plan owns it until `ready`), and its PID: killed and reaped
    /// when this image is ready.
    pub(crate) holder: Option<OwnedFd>,
    pub(crate) holder_pid: Option<i32>,
    /// The holder started this image under its own PID.
    pub(crate) rescued: bool,
    /// The readiness claim (see `sys::claim`), taken at `ready` before the
    /// holder is killed: `None` without a claim variable (a first start, a
    /// rescue, an older build's commit), `Some(None)` if one was named but
    /// could not be owned (it counts as the holder's).
    pub(crate) claim: Option<Option<OwnedFd>>,
    /// When the holder started (the handoff's `held=`).
    pub(crate) held_at_ns: Option<u64>,
    pub(crate) boot_ns: u64,
    pub(crate) restored_ns: u64,
    /// For a rollback: why.
    pub(crate) reason: String,
}

/// Kills the holder (through its pidfd: never another process); returns
/// whether it is to be reaped (see [`reap_holder`]). Its pidfd is closed
/// here, so that the image's descriptors are final when the outcome is
/// reported.
///
/// Without a pidfd (`pidfd_open` failed in `boot`), by PID: the holder is
/// our child, unreaped unless it already died, so the number is still its.
fn kill_holder(pidfd: Option<OwnedFd>, pid: i32) -> bool {
    let by_pid = || sys::kill(pid);
    let killed = match &pidfd {
        Some(fd) => sys::pidfd_kill(fd.as_fd()).or_else(|_| by_pid()),
        None => by_pid(),
    };
    if let Err(e) = killed {
        // Not waited for: a live holder would block the helper thread.
        tracing::warn!(holder = pid, "could not kill the holder: {e}");
        return false;
    }
    // Reaped by PID, so that no descriptor lingers: the holder is our
    // child, so its PID cannot be reused before it is reaped.
    drop(pidfd);
    true
}

/// Takes the readiness claim before this image kills the holder (see
/// `sys::claim`). Returns if it is ours, or if the holder is gone (nobody
/// else will serve). Otherwise the holder took it at its deadline and is
/// killing this process: wait for that, serving nothing. A read that fails
/// (twice) says nothing about who has it, and is treated the same way: the
/// holder takes the claim at its deadline and rescues.
fn take_claim(claim: Option<&OwnedFd>, holder: Option<&OwnedFd>) {
    let taken = claim.map(|c| sys::once_more(|| sys::claim::take(c.as_fd()), |_| true));
    match taken {
        Some(Ok(true)) => return,
        Some(Ok(false)) => tracing::warn!("the holder's deadline passed first: it ends this image"),
        Some(Err(e)) => tracing::warn!(
            "could not take the readiness claim ({e}): the holder ends this image at its deadline"
        ),
        None => tracing::warn!(
            "the readiness claim is not this image's: the holder ends it at its deadline"
        ),
    }
    loop {
        match holder.map(|h| sys::wait_readable(h.as_fd(), Duration::from_secs(1))) {
            // The holder's end (readable pidfd), if it dies without killing
            // this process.
            Some(Ok(true)) => {
                tracing::warn!("the holder ended without ending this image: serving on");
                return;
            }
            Some(Ok(false)) => {}
            // No way to watch it: look again in a second.
            Some(Err(_)) | None => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// Waits, at most `limit`, for process `pid` to be gone.
fn wait_gone(pidfd: &OwnedFd, limit: Duration) -> bool {
    let until = std::time::Instant::now() + limit;
    while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
        match sys::wait_readable(pidfd.as_fd(), left) {
            Ok(true) => return true,
            Ok(false) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Reaps the killed holder on the helper thread: its exit tears down the
/// old image's memory, which takes time the event loop does not wait for.
fn reap_holder(worker: &Worker, pid: i32) {
    let reaped = worker.run(move || {
        let _ = sys::reap(pid);
    });
    if let Err(e) = reaped {
        tracing::debug!(holder = pid, "could not reap the holder: {e}");
    }
}

impl<S> Copyover<S> {
    /// `ready` in a migration's new process: the old process's `go` (or its
    /// end) first, then this process serves, and reports `complete`, and
    /// tells systemd it is the main process now.
    fn arrived(&mut self, arrival: crate::migration::Arrival, now: u64) {
        use crate::migration::Answer;
        match arrival.confirm() {
            Answer::Go => arrival.join_old_group(),
            Answer::Gone => {}
            // The old process serves these clients: this one must not touch
            // them, and has nothing else to do.
            Answer::Kept => std::process::exit(1),
            // Both serve: the outcome comes when this one serves alone.
            Answer::Share => {
                IMAGE_READY.store(true, Ordering::Release);
                self.open_window_here(arrival);
                return;
            }
        }
        // Only now: until `go`, the old process may still serve these
        // connections (a TLS session seals nothing here before).
        IMAGE_READY.store(true, Ordering::Release);
        self.serving_after_migration(&arrival, now, None);
    }

    /// With [`Config::migration_socket`]: listens for external newcomers
    /// (a failure is only logged: this process serves, and migrates by
    /// `copyover migrate` as ever).
    pub(super) fn open_door(&mut self) {
        if !self.config.migration_socket || self.door.is_some() {
            return;
        }
        let peers = self.config.migration_peers.clone();
        let knocked = Arc::clone(&self.knocked);
        match crate::migration::Door::open(peers, knocked, self.requests.tx.clone()) {
            Ok(door) => self.door = Some(door),
            Err(e) => {
                tracing::warn!("no migration socket: {e}; external newcomers cannot take over")
            }
        }
    }

    /// A migration's new process serves alone (after `go`, or at the end of
    /// a gradual migration): reports `complete`, and tells systemd it is
    /// the main process once the old one is gone.
    ///
    /// After a gradual migration, `longest_batch_ns` is the longest a batch
    /// took to arrive here: no client waited for more than that (and the
    /// sender's part), so it is reported as the blackout.
    pub(super) fn serving_after_migration(
        &self,
        arrival: &crate::migration::Arrival,
        now: u64,
        longest_batch_ns: Option<u64>,
    ) {
        let serving = monotonic_ns();
        let h = &arrival.header;
        let outcome = Outcome::Complete {
            from: h.writer_version.clone(),
            to: self.config.version.clone(),
            generation: self.generation,
            blackout_ms: ms(longest_batch_ns.unwrap_or(serving.saturating_sub(h.committed_at_ns))),
            phases: Phases {
                total_ms: Some(ms(serving.saturating_sub(h.requested_at_ns))),
                // For a migration: the hand-over, from the commit to the
                // last descriptor received.
                exec_ms: Some(ms(arrival.received_ns.saturating_sub(h.committed_at_ns))),
                restore_ms: Some(ms(arrival.restored_ns.saturating_sub(arrival.received_ns))),
                // A gradual migration adopted its users batch by batch.
                adopt_ms: longest_batch_ns
                    .is_none()
                    .then(|| ms(now.saturating_sub(arrival.restored_ns))),
                unheld_ms: None,
            },
        };
        tracing::debug!(
            from_pid = arrival.from,
            boot_ns = arrival.boot_ns,
            "took over by a migration"
        );
        self.report_later(outcome, 0.0, false);
        // systemd: this process becomes the main one once the old one is
        // gone, when it is the manager's own child (an orphan goes to the
        // nearest subreaper: PID 1, or the user's manager); a main PID
        // taken over from its parent would be an "alien" one, which a
        // `systemctl stop` SIGKILLs at once (systemd 252). After the
        // outcome: the old process's exit tears its memory down first,
        // which may take a while.
        // On a thread of its own, not the helper thread (its probes would
        // wait behind it); through the old process's pidfd (its number may
        // mean another process here). An old process that stays after the
        // migration (`--stay`) is still there after 30 s: then this one
        // does not claim to be the main process.
        let old = arrival.from;
        let Some(pidfd) = arrival.old_pidfd_owned() else {
            return;
        };
        let claim = move || {
            if wait_gone(&pidfd, Duration::from_secs(30)) {
                crate::notify::notify(&format!("MAINPID={}", std::process::id()));
            } else {
                tracing::info!(
                    old,
                    "process {old} is still there: not telling systemd this process is the main one"
                );
            }
        };
        // Started by the helper thread once the outcome is written.
        self.worker.run_or_here(move || {
            if let Err(e) = std::thread::Builder::new()
                .name("copyover-mainpid".into())
                .spawn(claim)
            {
                tracing::warn!("not telling systemd this process is the main one: {e}");
            }
        });
    }

    /// Declares this image ready: the inherited descriptors are claimed and
    /// registered. Disarms the rollback and the readiness deadline, and
    /// reports the outcome (`upgrade complete` with the versions, the
    /// generation and the blackout; after a rollback, `upgrade rolled back`
    /// with its reason) to the log, the status file and sd_notify: from
    /// the helper thread, so the line may follow one the application logs
    /// right after `ready` returns. Call it once, after start-up, on every
    /// kind of start.
    ///
    /// # Errors
    ///
    /// None today: what can fail here (opening this binary for a future
    /// rollback, cancelling the deadline) is logged, and the next upgrade
    /// tries again. The `Result` leaves room for checks to come; a caller
    /// that propagates it with `?` loses nothing.
    pub fn ready(&mut self) -> Result<(), Error> {
        if self.ready {
            return Ok(());
        }
        let result = self.become_ready();
        // Only now: a migration's new process that must not serve has left
        // (see `arrived`), and opened no migration socket.
        self.open_door();
        result
    }

    fn become_ready(&mut self) -> Result<(), Error> {
        let now = monotonic_ns();
        self.ready = true;
        if let Some(arrival) = self.arrival.take() {
            self.arrived(arrival, now);
            return Ok(());
        }
        let Some(r) = self.resume.take() else {
            IMAGE_READY.store(true, Ordering::Release);
            self.report_started();
            return Ok(());
        };
        // No way back is needed any more: the deadline and the plan go
        // (the timer first), then the holder, whose exit frees the old
        // image's memory in its own time.
        let planned = rollback::disarm();
        let holder = planned.or(r.holder);
        if let Some(claim) = &r.claim {
            take_claim(claim.as_ref(), holder.as_ref());
        }
        // Only now, with the rollback disarmed and the claim ours (a holder
        // that won it kills this image first): a restored TLS session seals
        // nothing that a rollback or a rescue could seal again.
        IMAGE_READY.store(true, Ordering::Release);
        let reap = r.holder_pid.filter(|&pid| kill_holder(holder, pid));
        drop(r.snapshot);
        drop(r.exec_record);
        let h = &r.header;
        let blackout_ms = ms(now.saturating_sub(h.committed_at_ns));
        if r.mode == Mode::Rollback {
            self.own_binary = Some(r.old_binary);
            let outcome = Outcome::RolledBack { reason: r.reason };
            self.report_later(outcome, blackout_ms, r.rescued);
            if let Some(pid) = reap {
                reap_holder(&self.worker, pid);
            }
            return Ok(());
        }
        // The previous binary was kept for a rollback.
        drop(r.old_binary);
        // Opened before the outcome is logged, so that whoever reads the
        // log sees the image's final descriptors.
        // Tried twice: without it the next upgrade has no way back until
        // it opens it again.
        let own = sys::once_more(open_own_binary, |_| true);
        let outcome = Outcome::Complete {
            from: h.writer_version.clone(),
            to: self.config.version.clone(),
            generation: self.generation,
            blackout_ms,
            phases: Phases {
                total_ms: Some(ms(now.saturating_sub(h.requested_at_ns))),
                exec_ms: Some(ms(r.boot_ns.saturating_sub(h.committed_at_ns))),
                restore_ms: Some(ms(r.restored_ns.saturating_sub(r.boot_ns))),
                adopt_ms: Some(ms(now.saturating_sub(r.restored_ns))),
                unheld_ms: r
                    .held_at_ns
                    .map(|held| ms(held.saturating_sub(h.committed_at_ns))),
            },
        };
        self.report_later(outcome, 0.0, false);
        if let Some(pid) = reap {
            reap_holder(&self.worker, pid);
        }
        match own {
            Ok(fd) => self.own_binary = Some(fd),
            // Serving goes on; the next upgrade tries again.
            Err(e) => tracing::warn!("{e}; the next upgrade will try again"),
        }
        Ok(())
    }
}
