//! A gradual migration as the handle drives it: asking for one, the window
//! in which both processes serve (batches out and in, forwarded messages),
//! and its end. The mechanism is in `migration::gradual`.

use super::*;

use crate::migration::{Arrived, Batch, Ending, Step, Window};

/// What a migration request file (`PID.migrate`) asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// `whole [stay]`.
    Whole {
        stay: bool,
    },
    /// `gradual BATCH MS [stay]`.
    Gradual {
        batch: usize,
        every: Duration,
        stay: bool,
    },
    Back,
}

fn parse_request(text: &str) -> Option<Request> {
    let mut words = text.split_whitespace();
    let request = match words.next()? {
        "back" => return words.next().is_none().then_some(Request::Back),
        "whole" => Request::Whole { stay: false },
        "gradual" => {
            let batch = words.next()?.parse::<usize>().ok()?.max(1);
            let every = Duration::from_millis(words.next()?.parse().ok()?);
            Request::Gradual {
                batch,
                every,
                stay: false,
            }
        }
        _ => return None,
    };
    let stay = match words.next() {
        None => false,
        Some("stay") => true,
        Some(_) => return None,
    };
    if words.next().is_some() {
        return None;
    }
    Some(match request {
        Request::Whole { .. } => Request::Whole { stay },
        Request::Gradual { batch, every, .. } => Request::Gradual { batch, every, stay },
        back => back,
    })
}

impl<S> Copyover<S> {
    /// Asks for a **gradual** migration to a new process (see
    /// [`crate::migration`]): as [`request_migration`](Self::request_migration),
    /// but the new process first gets only the shared part
    /// ([`Event::ShareApproved`]), both serve, and users move `batch` at a
    /// time, one batch every `every` (at least 10 ms, at most a day;
    /// [`Event::MoveUsers`]). Ignored (with a warning) while a migration
    /// is under way.
    pub fn request_gradual_migration(&mut self, batch: usize, every: Duration) {
        if self.migrating || self.window.is_some() {
            tracing::warn!("a migration is under way: this request for another one is dropped");
            return;
        }
        self.pending_gradual = Some((batch.max(1), every));
        self.request_migration();
    }

    /// During a gradual migration, in the old process: asks the new process
    /// to move every user back here, after which it exits. Ignored (with a
    /// warning) anywhere else.
    pub fn request_move_back(&mut self) {
        let Some(window) = self.window.as_mut() else {
            tracing::warn!("no gradual migration is under way: nobody to move back");
            return;
        };
        match window.ask_back() {
            Ok(()) => tracing::info!(from = window.peer, "moving every user back"),
            Err(e) => tracing::warn!("{e}"),
        }
    }

    /// Whether the migration under way leaves this process staying
    /// (serving nobody, `copyover migrate --stay`) instead of exiting. A
    /// server that hands over copies of sockets that its other threads keep
    /// open (`copyover::tokio::Server`) must abandon such a migration: the
    /// staying process would keep those connections from ending.
    pub fn migration_stays(&self) -> bool {
        self.migrating && self.stay
    }

    /// The other process of a gradual migration under way, or `None`.
    pub fn sharing_with(&self) -> Option<u32> {
        self.window.as_ref().map(|w| w.peer)
    }

    /// A SIGUSR2 (or `copyover migrate`) just taken: whether it asks for a
    /// gradual migration, or (in one under way) for everyone back. `true`
    /// if it was handled here (nothing more to start).
    pub(super) fn take_migration_request(&mut self) -> bool {
        let request = crate::status::take_migration_request();
        let request = request.and_then(|text| {
            let parsed = parse_request(&text);
            if parsed.is_none() {
                tracing::warn!(request = %text.trim(), "an unreadable migration request; ignored");
            }
            parsed
        });
        match request {
            Some(Request::Back) => {
                self.request_move_back();
                true
            }
            // The operator's request decides, over one from the code.
            Some(Request::Gradual { batch, every, stay }) => {
                self.pending_gradual = None;
                self.gradual = Some((batch, every));
                self.stay = stay;
                false
            }
            Some(Request::Whole { stay }) => {
                self.pending_gradual = None;
                self.stay = stay;
                false
            }
            // A plain SIGUSR2: whole, unless the code asked for a gradual
            // one (`request_gradual_migration`).
            None => {
                self.gradual = self.pending_gradual.take();
                false
            }
        }
    }

    /// A SIGUSR2 during a gradual migration: `true` if its request file
    /// asked for everyone back (done here) or for another migration
    /// (dropped, with a warning); `false` for a plain SIGUSR2, which waits
    /// for the end.
    pub(super) fn take_request_in_window(&mut self) -> bool {
        let Some(text) = crate::status::take_migration_request() else {
            return false;
        };
        if parse_request(&text) == Some(Request::Back) {
            self.request_move_back();
        } else {
            tracing::warn!(request = %text.trim(), "a gradual migration is under way: this request for another one is dropped");
        }
        true
    }

    /// Whether the migration asked for (or under way) is gradual.
    pub(super) fn is_gradual(&self) -> bool {
        self.gradual.is_some()
    }

    /// After the shared part was handed over: the window opens.
    pub(super) fn open_window(
        &mut self,
        newcomer: crate::migration::Newcomer,
        shared: Vec<std::os::fd::RawFd>,
    ) -> Result<Progress, UpgradeError> {
        let (batch, every) = self.gradual.take().unwrap_or((1, Duration::from_secs(1)));
        let with = newcomer.pid();
        let stay = std::mem::take(&mut self.stay).then_some(shared);
        let wake = self.requests.tx.clone();
        let window =
            Window::old(newcomer, batch, every, wake, stay).map_err(|source| UpgradeError::Io {
                what: "start the gradual migration's link",
                source,
            })?;
        tracing::info!(
            with,
            batch,
            every_ms = every.as_millis() as u64,
            "gradual migration: both processes serve"
        );
        self.window = Some(window);
        self.migrating = false;
        Ok(Progress::Sharing { with })
    }

    /// In the new process, at `ready`, after `share`.
    pub(super) fn open_window_here(&mut self, arrival: crate::migration::Arrival) {
        let from = arrival.from;
        match Window::new_side(arrival, self.requests.tx.clone()) {
            Ok(w) => {
                tracing::info!(from, "gradual migration: serving beside process {from}");
                self.window = Some(w);
            }
            // Without the link no user can come here, and nothing tells
            // the old process more: it sees this process leave and keeps
            // everyone.
            Err(e) => {
                tracing::error!("could not start the gradual migration's link ({e}); leaving");
                std::process::exit(1);
            }
        }
    }

    /// The window's next event, if any.
    pub(super) fn poll_window(&mut self) -> Option<Event> {
        let step = self.window.as_mut()?.step()?;
        Some(match step {
            Step::Move(most) => Event::MoveUsers { most },
            Step::Arrived => Event::UsersArrived,
            Step::Forwarded(m) => Event::Forwarded(m),
            Step::Ended(ending) => {
                self.close_window(ending);
                Event::MigrationEnded
            }
        })
    }

    fn close_window(&mut self, ending: Ending) {
        let Some(window) = self.window.take() else {
            return;
        };
        let peer = window.peer;
        let (moved_out, moved_in) = (window.moved_out, window.moved_in);
        // Users moved there and not back.
        let there = moved_out.saturating_sub(moved_in);
        if window.is_old() {
            let (reason, alive) = match ending {
                Ending::MovedBack | Ending::Done => (
                    format!(
                        "gradual migration: every user moved back from process {peer} ({moved_out} moved there, {moved_in} back)"
                    ),
                    false,
                ),
                Ending::Lost { why, alive: false } => (
                    format!(
                        "gradual migration: process {peer} ended before it was done ({why}); the {there} user(s) it had taken are lost with it, every other user is here"
                    ),
                    false,
                ),
                Ending::Lost { why, alive: true } => (
                    format!(
                        "gradual migration: the link to process {peer} broke ({why}); it serves on, on its own, the {there} user(s) it had taken, and this process every other user"
                    ),
                    true,
                ),
            };
            // A new process that lives keeps its users; one that is gone
            // (or left) is reaped.
            drop(window.close(alive));
            let elapsed = ms(monotonic_ns().saturating_sub(self.requested_at_ns));
            self.report_later(Outcome::RolledBack { reason }, elapsed, false);
            self.wake_if_queued();
            return;
        }
        let old_lives = matches!(ending, Ending::Lost { alive: true, .. });
        if let Ending::Lost { why, alive } = &ending {
            tracing::warn!(
                from = peer,
                "gradual migration: the link to process {peer} ended ({why}); {}",
                if *alive {
                    "it lives and serves its own users: this process serves the users it took, on its own"
                } else {
                    "it is gone: this process serves alone"
                }
            );
        }
        if matches!(ending, Ending::Done) {
            window.join_old_group();
        }
        let longest = window.longest_batch_ns;
        // While the old process lives this one is not the service's main
        // process: no outcome, no `MAINPID`.
        if let Some(arrival) = window.close(false)
            && !old_lives
        {
            self.serving_after_migration(&arrival, monotonic_ns(), Some(longest));
        }
        self.wake_if_queued();
    }

    /// Moves a batch of users to the other process of a gradual migration
    /// (on [`Event::MoveUsers`]), and returns how many moved: those are the
    /// other process's now, close them here (drop the sockets, forget the
    /// records). On an error none moved: keep serving them.
    ///
    /// The batch is a two-step hand-over of its own: the other process
    /// takes the descriptors and records and says so, then this one says
    /// they are its own. Until then the other process has not touched them,
    /// so nothing is read twice or lost; a process that dies in between
    /// leaves them with the one that lives.
    ///
    /// **An empty batch ends the migration**: this process has no users
    /// left. It does not return then: the old process reports `migrated`
    /// and exits 0 (the new one serves alone); a new process moving users
    /// back exits 0 (the old one serves alone).
    ///
    /// # Errors
    ///
    /// [`UpgradeError::Handoff`] if no gradual migration is under way or this
    /// process is not the one moving users, and
    /// [`UpgradeError::Migration`] if the other process refused the batch,
    /// did not take it within [`Config::ready_timeout`], or is gone.
    pub fn move_users(&mut self, batch: &Batch<'_>) -> Result<usize, UpgradeError> {
        let Some(window) = self.window.as_mut() else {
            return Err(UpgradeError::Handoff {
                reason: "no gradual migration is under way".into(),
            });
        };
        let pid = window.peer;
        if batch.is_empty() {
            if !window.is_moving() {
                return Err(UpgradeError::Handoff {
                    reason: "this process is not moving users now".into(),
                });
            }
            let reporter = self.reporter(0.0, false);
            if let Some(window) = self.window.take() {
                // Closed first (its file removed): this process exits, or
                // stays serving nobody.
                drop(self.door.take());
                // Returns only if the other process cannot be told: this
                // one serves on, and the window ends at the next poll.
                self.window = Some(window.finish(&self.requests, &reporter));
                self.open_door();
            }
            return Err(UpgradeError::Migration {
                pid,
                reason: "the migration could not end: the other process is gone".into(),
            });
        }
        window
            .move_batch(batch, self.config.ready_timeout)
            .map_err(|reason| UpgradeError::Migration { pid, reason })
    }

    /// Takes the users that arrived (on [`Event::UsersArrived`]), decoded
    /// as `R`; they are this process's from now on: register and serve
    /// them, and deliver [`Arrived::missed`] to them.
    ///
    /// # Errors
    ///
    /// [`Error::Arrival`] if nothing arrived, the records do not decode as
    /// `R` (the other process is told, and keeps them), or the other
    /// process kept them.
    pub fn take_users<R: serde::de::DeserializeOwned>(&mut self) -> Result<Arrived<R>, Error> {
        let Some(window) = self.window.as_mut() else {
            return Err(Error::Arrival {
                from: 0,
                reason: "no gradual migration is under way".into(),
            });
        };
        let from = window.peer;
        window
            .take_batch()
            .map_err(|reason| Error::Arrival { from, reason })
    }

    /// Forwards a message to the other process of a gradual migration,
    /// which gets it as [`Event::Forwarded`], in order: a chat line its
    /// users should see, a change of who is online. `Ok(false)` if no
    /// gradual migration is under way (nothing to forward to).
    ///
    /// # Errors
    ///
    /// [`UpgradeError::Handoff`] for a message longer than
    /// [`MAX_FORWARD`](crate::migration::MAX_FORWARD), and
    /// [`UpgradeError::Migration`] if the other process is gone (the window
    /// ends at the next poll).
    pub fn forward(&mut self, message: &[u8]) -> Result<bool, UpgradeError> {
        let Some(window) = self.window.as_mut() else {
            return Ok(false);
        };
        if message.len() > crate::migration::MAX_FORWARD {
            return Err(UpgradeError::Handoff {
                reason: format!(
                    "a forwarded message of {} bytes; the most is {}",
                    message.len(),
                    crate::migration::MAX_FORWARD
                ),
            });
        }
        let pid = window.peer;
        window
            .forward(message)
            .map(|()| true)
            .map_err(|reason| UpgradeError::Migration { pid, reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_back_and_nonsense_is_refused() {
        assert_eq!(parse_request("back\n"), Some(Request::Back));
        assert_eq!(
            parse_request("whole stay\n"),
            Some(Request::Whole { stay: true })
        );
        assert_eq!(parse_request("whole"), Some(Request::Whole { stay: false }));
        assert_eq!(
            parse_request("gradual 3 250\n"),
            Some(Request::Gradual {
                batch: 3,
                every: Duration::from_millis(250),
                stay: false
            })
        );
        assert_eq!(
            parse_request("gradual 0 10 stay"),
            Some(Request::Gradual {
                batch: 1,
                every: Duration::from_millis(10),
                stay: true
            })
        );
        for bad in [
            "",
            "gradual",
            "gradual x 10",
            "gradual 3",
            "forward 1 2",
            "whole go",
            "back stay",
            "gradual 1 10 stay now",
        ] {
            assert_eq!(parse_request(bad), None, "{bad}");
        }
    }
}
