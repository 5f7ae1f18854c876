//! The upgrade as the handle drives it: the events its phases give
//! (`upgrade::phase`), the request, the probe's start, the commit, an
//! abandon.

use super::*;

use std::sync::atomic::Ordering;

impl<S> Copyover<S> {
    /// Returns the next event, or `None`. Call it until it returns `None`
    /// each time [`event_fd`](Self::event_fd) is readable.
    pub fn poll(&mut self) -> Option<Event> {
        self.requests.drain();
        if signal::take(&self.requests.shutdown) {
            return Some(Event::Shutdown);
        }
        if let Some(event) = self.poll_window() {
            return Some(event);
        }
        let since_request =
            Duration::from_nanos(monotonic_ns().saturating_sub(self.requested_at_ns));
        match self.phase.settle(since_request, self.config.probe_timeout) {
            Some(Settled::Approved { to_version }) => {
                let probe_ms = ms(since_request.as_nanos() as u64);
                tracing::debug!(phase = "probe", probe_ms, %to_version, "the new binary accepted the snapshot");
                if !self.migrating {
                    return Some(Event::UpgradeApproved);
                }
                if let Err(e) = self.start_newcomer() {
                    return Some(self.refuse_migration(e));
                }
            }
            Some(Settled::Refused { reason }) => {
                self.migrating = false;
                self.gradual = None;
                let reason = UpgradeError::Probe { reason }.to_string();
                self.log_refused(&reason);
                return Some(Event::UpgradeRefused { reason });
            }
            None => {}
        }
        // A migration is approved once its new process is in its `boot`.
        if let Some(result) = self.arriving.as_ref().and_then(|a| a.take()) {
            self.arriving = None;
            match result {
                Ok(newcomer) => {
                    self.newcomer = Some(newcomer);
                    return Some(if self.is_gradual() {
                        Event::ShareApproved
                    } else {
                        Event::UpgradeApproved
                    });
                }
                Err(e) => return Some(self.refuse_migration(e)),
            }
        }
        self.poll_signals()
    }

    /// Ends a migration before its commit: the new process killed, the
    /// refusal reported.
    fn refuse_migration(&mut self, e: UpgradeError) -> Event {
        self.phase = Phase::Idle;
        self.migrating = false;
        self.gradual = None;
        self.arriving = None;
        self.newcomer = None;
        let reason = e.to_string();
        self.log_refused(&reason);
        Event::UpgradeRefused { reason }
    }

    /// A migration's new process, started from the probed binary (on the
    /// helper thread) as soon as the probe approved it: it loads and starts
    /// while this process still serves, and waits in its `boot`; its
    /// `hello` wakes the loop (see `poll`).
    fn start_newcomer(&mut self) -> Result<(), UpgradeError> {
        let Phase::Approved { exe, .. } = &self.phase else {
            return Ok(());
        };
        let arriving = crate::migration::Arriving::start(
            &self.worker,
            Arc::clone(exe),
            self.argv.clone(),
            self.config.probe_timeout,
            self.requests.tx.clone(),
        )
        .map_err(|source| UpgradeError::Io {
            what: "start the new process",
            source,
        })?;
        self.arriving = Some(arriving);
        Ok(())
    }

    fn poll_signals(&mut self) -> Option<Event> {
        let upgrade = signal::take(&self.requests.upgrade);
        let mut migrate = signal::take(&self.requests.migrate);
        if signal::take(&self.knocked)
            && let Some(event) = self.answer_knock(upgrade || migrate)
        {
            return Some(event);
        }
        // The request file is read when its migration starts, or (`back`)
        // during a gradual one: never for a migration already under way.
        if migrate && self.window.is_some() && self.take_request_in_window() {
            migrate = false;
        }
        if let Some(window) = self.window.as_mut().filter(|_| upgrade || migrate) {
            // Not while a gradual migration runs: after it, in whichever
            // process then serves (the old one passes it on).
            if !std::mem::replace(&mut window.told_waiting, true) {
                tracing::info!("a gradual migration is under way: the request waits for its end");
            }
            if upgrade {
                self.requests.upgrade.store(true, Ordering::SeqCst);
            }
            if migrate {
                self.requests.migrate.store(true, Ordering::SeqCst);
            }
            return signal::take(&self.requests.save).then_some(Event::SaveSnapshot);
        }
        // A request of the other kind than the one under way (or than the
        // one started now) waits for it: its flag is set again, and the
        // next poll after the outcome starts it (across an exec, the commit
        // raises it again; after a migration, the old process passes it on).
        let wait = |flag: &std::sync::atomic::AtomicBool| flag.store(true, Ordering::SeqCst);
        if upgrade || migrate {
            if matches!(self.phase, Phase::Idle) {
                // Both at once: the upgrade first, which needs no new process.
                self.migrating = !upgrade;
                if self.migrating {
                    // Gradual or whole (and whether to stay) is decided
                    // here, once.
                    self.gradual = None;
                    self.stay = false;
                    if self.take_migration_request() {
                        // `back` with no gradual migration under way: said,
                        // and nothing to start.
                        self.migrating = false;
                        return signal::take(&self.requests.save).then_some(Event::SaveSnapshot);
                    }
                }
                if upgrade && migrate {
                    wait(&self.requests.migrate);
                }
                self.requested_at_ns = monotonic_ns();
                crate::notify::notify(&format!(
                    "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=upgrading",
                    crate::notify::monotonic_usec()
                ));
                return Some(Event::Upgrade);
            }
            if (upgrade && !self.migrating) || (migrate && self.migrating) {
                tracing::info!("an upgrade is already under way; the new request joins it");
            }
            if migrate
                && self.migrating
                && let Some(text) = crate::status::take_migration_request()
            {
                tracing::warn!(request = %text.trim(), "a migration is under way: this request for another one is dropped");
            }
            if upgrade && self.migrating {
                wait(&self.requests.upgrade);
            }
            if migrate && !self.migrating {
                wait(&self.requests.migrate);
            }
        }
        if signal::take(&self.requests.save) {
            return Some(Event::SaveSnapshot);
        }
        None
    }

    /// An external newcomer knocked at the migration socket: its migration
    /// starts now if nothing else is under way or asked for (with what a
    /// prepared request file says: gradual, staying); otherwise it is told
    /// so and let go. A knock is never queued, raised again or passed on.
    fn answer_knock(&mut self, busy: bool) -> Option<Event> {
        let knock = self.door.as_ref().and_then(|d| d.take())?;
        if busy || self.window.is_some() || !matches!(self.phase, Phase::Idle) {
            knock.refuse("an upgrade or a migration is under way here; try again after it");
            return None;
        }
        self.migrating = true;
        self.gradual = None;
        self.stay = false;
        if self.take_migration_request() {
            // `back`, with no gradual migration under way: nothing to start.
            self.migrating = false;
            knock.refuse("the prepared request asks for no migration");
            return None;
        }
        self.knock = Some(knock);
        self.requested_at_ns = monotonic_ns();
        crate::notify::notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=upgrading",
            crate::notify::monotonic_usec()
        ));
        Some(Event::Upgrade)
    }

    /// Moves the upgrade forward; call it on [`Event::Upgrade`] and on
    /// [`Event::UpgradeApproved`] with the whole current state and every
    /// descriptor to keep.
    ///
    /// * The first call checks the binary and starts the probe, then returns
    ///   [`Progress::Probing`]: keep serving.
    /// * Once the probe said yes, [`Event::UpgradeApproved`] comes; this call
    ///   then commits: it writes the snapshot and executes the new binary.
    ///   **It does not return on success**: the new image carries on.
    ///
    /// # Errors
    ///
    /// An [`UpgradeError`] saying why no upgrade happened (the binary is
    /// missing, the handoff is inconsistent, the exec failed...). The
    /// runtime reports `upgrade refused: REASON` (from its helper thread);
    /// the application keeps serving, and owns all its descriptors as
    /// before. One flag is not put back as it was: a commit that fails
    /// leaves every fd from 3 up close-on-exec (the state in which an image
    /// normally runs), so one the application had left inheritable on
    /// purpose (for a child it starts later) must be made inheritable again
    /// by the application.
    pub fn upgrade(&mut self, state: &S, keep: &Handoff<'_>) -> Result<Progress, UpgradeError>
    where
        S: AppState,
    {
        let result = self.advance(state, keep);
        if let Err(e) = &result {
            self.phase = Phase::Idle;
            self.migrating = false;
            self.gradual = None;
            self.knock = None;
            // A migration's new process that did not take over is killed.
            self.arriving = None;
            self.newcomer = None;
            if let UpgradeError::Migration { .. } = e {
                let elapsed = ms(monotonic_ns().saturating_sub(self.requested_at_ns));
                let outcome = Outcome::RolledBack {
                    reason: e.to_string(),
                };
                self.report_later(outcome, elapsed, false);
            } else {
                self.log_refused(&e.to_string());
            }
            self.wake_if_queued();
        }
        result
    }

    /// A request of the other kind that waited for this one (see
    /// `poll_signals`) is started by the next poll: the loop is woken for it.
    pub(super) fn wake_if_queued(&self) {
        let queued = |flag: &std::sync::atomic::AtomicBool| flag.load(Ordering::SeqCst);
        if queued(&self.requests.upgrade) || queued(&self.requests.migrate) {
            self.requests.wake();
        }
    }

    fn advance(&mut self, state: &S, keep: &Handoff<'_>) -> Result<Progress, UpgradeError>
    where
        S: AppState,
    {
        if !self.ready {
            return Err(UpgradeError::Handoff {
                reason: "this image has not called Copyover::ready yet".into(),
            });
        }
        if self.requested_at_ns == 0 {
            self.requested_at_ns = monotonic_ns();
        }
        let manifest = keep
            .manifest()
            .map_err(|reason| UpgradeError::Handoff { reason })?;
        if self.own_binary.is_none() {
            // `ready` could not open it: try again now.
            self.own_binary = open_own_binary().ok();
        }
        let own_binary = self
            .own_binary
            .as_ref()
            .ok_or_else(|| UpgradeError::Handoff {
                reason: "the runtime has no descriptor of its own binary to roll back to (opening /proc/self/exe failed)".into(),
            })?;
        let mut header = self.header(monotonic_ns());
        header.state_version = S::VERSION;
        // Taken: the commit takes what the probe prepared; every other way
        // out puts a phase back (`upgrade` makes an error Idle).
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            probing @ Phase::Probing(..) => {
                self.phase = probing;
                Ok(Progress::Probing)
            }
            Phase::Idle if self.migrating && self.knock.is_some() => {
                self.probe_external(state, &header, manifest)?;
                self.phase = Phase::External;
                Ok(Progress::Probing)
            }
            Phase::External if self.newcomer.is_none() => {
                // Its probe is under way.
                self.phase = Phase::External;
                Ok(Progress::Probing)
            }
            Phase::External => self.hand_over_to_newcomer(state, header, manifest, None),
            Phase::Idle => {
                let exe = Arc::new(Executable::open(&self.binary)?);
                // Only the encoding happens in the event loop; the probe's
                // thread writes the snapshot, starts the new binary and, off
                // the critical path, prepares the commit's memfd for a
                // state somewhat larger than this one.
                let payload = crate::snapshot::encode_state(state)?;
                self.payload_hint = payload.len() + payload.len() / 8 + 4096;
                let reserve = crate::snapshot::HEADER_LEN + 64 * manifest.len() + self.payload_hint;
                let spec = ProbeSpec {
                    exe: exe.clone(),
                    argv: self.argv.clone(),
                    env: clean_env(),
                    header,
                    manifest: manifest.clone(),
                    payload,
                    timeout: self.config.probe_timeout,
                    reserve: reserve as u64,
                    migrate: self.migrating,
                };
                let probe = Probe::start(spec, &self.worker, self.requests.tx.clone()).map_err(
                    |source| UpgradeError::Io {
                        what: "start the probe",
                        source,
                    },
                )?;
                tracing::debug!(phase = "probe", binary = ?self.binary, "probing the new binary");
                self.phase = Phase::Probing(probe, exe);
                Ok(Progress::Probing)
            }
            Phase::Approved {
                to_version,
                prepared,
                exe: exe_of_approved,
            } if self.migrating => {
                if self.newcomer.is_none() {
                    // Not approved yet: its new process is still starting.
                    self.phase = Phase::Approved {
                        to_version,
                        exe: exe_of_approved,
                        prepared,
                    };
                    return Ok(Progress::Probing);
                }
                tracing::debug!(%to_version, "handing over to the new process");
                self.hand_over_to_newcomer(state, header, manifest, prepared.draft)
            }
            Phase::Approved {
                to_version,
                exe,
                prepared,
            } => {
                tracing::debug!(%to_version, fds = manifest.len(), "committing the upgrade");
                Err(commit(
                    state,
                    Commit {
                        header,
                        manifest,
                        own_binary,
                        exe: &exe,
                        argv: &self.argv,
                        requests: &self.requests,
                        prepared,
                        payload_hint: self.payload_hint,
                        worker: &self.worker,
                        ready_timeout: self.config.ready_timeout,
                    },
                ))
            }
        }
    }

    /// The commit of a migration: everything (or, for a gradual one, the
    /// shared part) to the newcomer that said `hello` and passed the probe.
    fn hand_over_to_newcomer(
        &mut self,
        state: &S,
        header: crate::snapshot::Header,
        manifest: &crate::snapshot::Manifest,
        draft: Option<crate::snapshot::Draft>,
    ) -> Result<Progress, UpgradeError>
    where
        S: AppState,
    {
        let newcomer = self.newcomer.take().ok_or_else(|| UpgradeError::Handoff {
            reason: "the migration's new process was not started".into(),
        })?;
        tracing::debug!(
            fds = manifest.len(),
            newcomer = newcomer.pid(),
            "handing over to the new process"
        );
        let reporter = self.reporter(0.0, false);
        let gradual = self.is_gradual();
        // Closed first (its file removed): a whole migration's success
        // exits without destructors. Opened again if this process serves on.
        drop(self.door.take());
        let handed = crate::migration::hand_over(
            state,
            crate::migration::HandOver {
                header,
                manifest,
                newcomer,
                draft,
                payload_hint: self.payload_hint,
                requests: &self.requests,
                ready_timeout: self.config.ready_timeout,
                reporter,
                gradual,
                stay: self.stay,
            },
        );
        self.open_door();
        self.open_window(handed?, manifest.fds().collect())
    }

    /// Starts the probe of the external newcomer that knocked: the state
    /// sealed as it would be handed over, without descriptors, checked by
    /// the newcomer itself over its socket (on the helper thread); its
    /// answer wakes the loop (see `poll`).
    fn probe_external(
        &mut self,
        state: &S,
        header: &crate::snapshot::Header,
        manifest: &crate::snapshot::Manifest,
    ) -> Result<(), UpgradeError>
    where
        S: AppState,
    {
        let knock = self.knock.take().ok_or_else(|| UpgradeError::Handoff {
            reason: "no external newcomer knocked".into(),
        })?;
        let payload = crate::snapshot::encode_state(state)?;
        self.payload_hint = payload.len() + payload.len() / 8 + 4096;
        let (memfd, _) = crate::snapshot::Draft::new(0)
            .and_then(|d| d.seal_state(header, manifest, state, self.payload_hint))?;
        let arriving = crate::migration::Arriving::external(
            &self.worker,
            knock,
            memfd,
            self.config.probe_timeout,
            self.requests.tx.clone(),
        )
        .map_err(|source| UpgradeError::Io {
            what: "start the external newcomer's probe",
            source,
        })?;
        tracing::debug!(phase = "probe", "probing the external newcomer");
        self.arriving = Some(arriving);
        Ok(())
    }

    /// Abandons the upgrade under way, before its commit: it ends as
    /// `upgrade refused: the server abandoned the upgrade: REASON`, reported
    /// like any refusal (log, status file, sd_notify, the `copyover` CLI's
    /// exit status), and the next SIGHUP starts a new one. A probe still
    /// running is killed. Call it on [`Event::UpgradeApproved`] when the
    /// server cannot reach a safe point (for a tokio server: when
    /// [`Quiesce::pause`](crate::tokio::Quiesce::pause) returns
    /// `Unpaused`). Does nothing if no upgrade is under way.
    pub fn abandon(&mut self, reason: &str) {
        self.arriving = None;
        self.newcomer = None;
        self.knock = None;
        self.migrating = false;
        self.gradual = None;
        self.wake_if_queued();
        if !self.phase.abandon() {
            return;
        }
        let reason = UpgradeError::Abandoned {
            reason: reason.into(),
        };
        self.log_refused(&reason.to_string());
    }
}
