//! A gradual migration: both processes serve, and users move from the old
//! one to the new one a batch at a time ([`Window`]), each batch a
//! two-step hand-over of its own (see the
//! [protocol](super#a-gradual-migration-protocol-version-1)).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::link::{
    ACK, BACK, DONE, Incoming, Link, MAX_FORWARD, MINE, Received, TOOK, YOURS, numbered, refusal,
};
use super::{Newcomer, departure};
use crate::error::UpgradeError;
use crate::signal::Requests;
use crate::status::{Outcome, Reporter};
use crate::sys;

/// The users an application moves to the other process in one batch, each
/// with its own record (what belongs to that user and no one else: the
/// connection's state, its buffered input and output) and its descriptors.
/// See [`Copyover::move_users`](crate::Copyover::move_users).
#[derive(Debug, Default)]
pub struct Batch<'a> {
    records: Vec<(Vec<u8>, u32)>,
    fds: Vec<BorrowedFd<'a>>,
}

impl<'a> Batch<'a> {
    /// An empty batch. Moved, it says "this process has no users left":
    /// the migration ends (see [`Copyover::move_users`](crate::Copyover::move_users)).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one user: its record, and the descriptors it owns (its
    /// connection), in the order the receiver gets them back.
    ///
    /// # Errors
    ///
    /// [`UpgradeError::Snapshot`] if the record cannot be encoded.
    pub fn user<R: Serialize>(
        &mut self,
        record: &R,
        fds: &[BorrowedFd<'a>],
    ) -> Result<&mut Self, UpgradeError> {
        let bytes = crate::snapshot::encode_state(record)?;
        self.records.push((bytes, fds.len() as u32));
        self.fds.extend_from_slice(fds);
        Ok(self)
    }

    /// How many users it holds.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether it holds no user.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// The users a batch brought ([`Copyover::take_users`](crate::Copyover::take_users)).
#[derive(Debug)]
#[non_exhaustive]
pub struct Arrived<R> {
    /// Each user's record and descriptors, as the sender added them.
    pub users: Vec<(R, Vec<OwnedFd>)>,
    /// Messages this process forwarded ([`Copyover::forward`](crate::Copyover::forward))
    /// that these users have not seen: the other process had not handled
    /// them when it made the batch. Deliver them to these users (and only
    /// to them) as the other process would have.
    pub missed: Vec<Vec<u8>>,
}

/// Which side of the migration this process is.
#[derive(Debug)]
pub(crate) enum Side {
    /// The old process, with the new one it started.
    Old { newcomer: Newcomer },
    /// The new process: the way to the old one (its pidfd, its process
    /// group, and what the outcome reports once this one serves alone).
    New { arrival: Box<super::Arrival> },
}

/// How many forwarded messages are kept for users that move after them:
/// the other process acknowledges what it took every [`ACK_EVERY`].
const KEEP_SENT: usize = 65_536;
const ACK_EVERY: u64 = 64;

/// A gradual migration under way in this process.
#[derive(Debug)]
pub(crate) struct Window {
    pub(crate) side: Side,
    link: Arc<Link>,
    /// The other process.
    pub(crate) peer: u32,
    /// This process moves its users now (the old one from the start; the
    /// new one once asked to move everyone back).
    moving: bool,
    batch: usize,
    every: Duration,
    next_batch: Instant,
    /// The number of the next batch sent from here.
    next_id: u64,
    /// Forwarded messages the application took here, and sent from here.
    taken: u64,
    sent: u64,
    /// Sent and not yet acknowledged, by number.
    sent_log: VecDeque<(u64, Vec<u8>)>,
    /// A batch received and announced, waiting for `take_users`.
    pending: Option<Received>,
    /// The longest a batch took here, from its first message to its users
    /// taken (ns): the stall its users saw, less the sender's part.
    pub(crate) longest_batch_ns: u64,
    pub(crate) moved_out: usize,
    pub(crate) moved_in: usize,
    /// A request that waits for the window's end was logged.
    pub(crate) told_waiting: bool,
    /// The old process stays after the migration (serving nobody): the
    /// shared descriptors it handed over, to let go of then.
    stay: Option<Vec<RawFd>>,
}

/// What the event loop learns from the window.
#[derive(Debug)]
pub(crate) enum Step {
    /// A batch is due: `most` users.
    Move(usize),
    /// A batch arrived.
    Arrived,
    Forwarded(Vec<u8>),
    /// The window ended: the other process is gone, or handed its last
    /// users over. Why, for the outcome.
    Ended(Ending),
}

/// How a window ended.
#[derive(Debug)]
pub(crate) enum Ending {
    /// The old process moved its last users here and exited.
    Done,
    /// The new process moved everyone back here and exited.
    MovedBack,
    /// The link ended without either: the other process died, or (if it
    /// lives: `alive`) the link broke, and each process keeps the users it
    /// has.
    Lost { why: String, alive: bool },
}

/// The shortest time between two batches: a shorter one would have the
/// event loop do nothing but batches.
const MIN_EVERY: Duration = Duration::from_millis(10);
/// The longest: a day (longer is a typing error, or "never").
const MAX_EVERY: Duration = Duration::from_secs(86_400);

impl Window {
    /// The old process's side, after the new one said `ready` to the
    /// shared part and got `share`.
    pub(crate) fn old(
        newcomer: Newcomer,
        batch: usize,
        every: Duration,
        wake: Arc<OwnedFd>,
        stay: Option<Vec<RawFd>>,
    ) -> std::io::Result<Window> {
        let sock = newcomer.link_socket()?;
        let peer = newcomer.pid();
        let mut w = Window::new(Side::Old { newcomer }, peer, sock, wake)?;
        w.stay = stay;
        w.start_moving(batch, every);
        Ok(w)
    }

    /// The new process's side, once `ready` got `share`.
    pub(crate) fn new_side(arrival: super::Arrival, wake: Arc<OwnedFd>) -> std::io::Result<Window> {
        let sock = arrival.link_socket()?;
        let peer = arrival.from;
        Window::new(
            Side::New {
                arrival: Box::new(arrival),
            },
            peer,
            sock,
            wake,
        )
    }

    fn new(side: Side, peer: u32, sock: OwnedFd, wake: Arc<OwnedFd>) -> std::io::Result<Window> {
        Ok(Window {
            side,
            link: Link::start(sock, wake)?,
            peer,
            moving: false,
            batch: 1,
            every: Duration::from_secs(1),
            next_batch: Instant::now(),
            next_id: 1,
            taken: 0,
            sent: 0,
            sent_log: VecDeque::new(),
            pending: None,
            moved_out: 0,
            moved_in: 0,
            told_waiting: false,
            longest_batch_ns: 0,
            stay: None,
        })
    }

    fn start_moving(&mut self, batch: usize, every: Duration) {
        self.moving = true;
        self.batch = batch.max(1);
        self.every = every.clamp(MIN_EVERY, MAX_EVERY);
        self.next_batch = Instant::now();
        self.link.wake_at(sys::monotonic_ns());
    }

    /// Whether this is the old process's side.
    pub(crate) fn is_old(&self) -> bool {
        matches!(self.side, Side::Old { .. })
    }

    /// Whether this process moves its users now.
    pub(crate) fn is_moving(&self) -> bool {
        self.moving
    }

    /// The next thing for the event loop, if any.
    pub(crate) fn step(&mut self) -> Option<Step> {
        while let Some(message) = self.link.next() {
            match message {
                Incoming::Users(batch) => {
                    self.pending = Some(batch);
                    return Some(Step::Arrived);
                }
                Incoming::Unreceived(id, reason) => {
                    tracing::warn!(
                        peer = self.peer,
                        "refusing a batch from process {}: {reason}",
                        self.peer
                    );
                    let _ = self.link.send(&refusal(id, &reason), &[]);
                }
                Incoming::Forwarded(m) => {
                    self.taken += 1;
                    if self.taken.is_multiple_of(ACK_EVERY) {
                        let _ = self
                            .link
                            .send(format!("{ACK}{}", self.taken).as_bytes(), &[]);
                    }
                    return Some(Step::Forwarded(m));
                }
                Incoming::Ack(n) => {
                    while self.sent_log.front().is_some_and(|(k, _)| *k <= n) {
                        self.sent_log.pop_front();
                    }
                }
                Incoming::Back { batch, every } if !self.is_old() => {
                    tracing::info!(
                        batch,
                        every_ms = every.as_millis() as u64,
                        "moving every user back to process {}",
                        self.peer
                    );
                    self.start_moving(batch, every);
                }
                // The sender gave up on the batch (its time ran out) before
                // it was taken: it keeps it.
                Incoming::Mine(id) if self.pending.as_ref().is_some_and(|p| p.id == id) => {
                    self.pending = None;
                }
                Incoming::Done => {
                    return Some(Step::Ended(if self.is_old() {
                        Ending::MovedBack
                    } else {
                        Ending::Done
                    }));
                }
                Incoming::End(why) => {
                    // Its socket ends as it exits: a second is long enough
                    // for the exit to show (and the event loop waits).
                    let alive = !self.peer_is_gone(Duration::from_secs(1));
                    return Some(Step::Ended(Ending::Lost { why, alive }));
                }
                // An answer about a batch this process no longer waits
                // for (it gave up on it): ignored.
                other => tracing::debug!(?other, "gradual migration: a message with no place here"),
            }
        }
        if self.moving && Instant::now() >= self.next_batch && !self.link.ended() {
            self.next_batch = Instant::now() + self.every;
            let next = Duration::from_nanos(sys::monotonic_ns()).saturating_add(self.every);
            self.link
                .wake_at(u64::try_from(next.as_nanos()).unwrap_or(u64::MAX));
            return Some(Step::Move(self.batch));
        }
        None
    }

    /// The old process asks the new one to move everyone back; it moves
    /// no one from now on.
    pub(crate) fn ask_back(&mut self) -> Result<(), String> {
        if !self.is_old() {
            return Err("only the old process can ask for everyone back".into());
        }
        self.moving = false;
        // Back is the quick way out: a batch every 100 ms at most.
        let every = self.every.min(Duration::from_millis(100));
        let message = format!("{BACK} {} {}", self.batch, every.as_millis());
        self.link
            .send(message.as_bytes(), &[])
            .map_err(|e| format!("could not ask process {} (it is gone?): {e}", self.peer))
    }

    /// Sends `batch` and waits (until `timeout` passes) for the other
    /// process to take it; then tells it the batch is its own. On any
    /// failure the batch stays here (the other process is told so, or is
    /// gone), and this says why.
    pub(crate) fn move_batch(
        &mut self,
        batch: &Batch<'_>,
        timeout: Duration,
    ) -> Result<usize, String> {
        if !self.moving {
            return Err("this process is not moving users now".into());
        }
        let records = postcard::to_allocvec(&batch.records)
            .map_err(|e| format!("could not encode the batch: {e}"))?;
        let fds: Vec<RawFd> = batch.fds.iter().map(|f| f.as_raw_fd()).collect();
        let id = self.next_id;
        self.next_id += 1;
        let started = Instant::now();
        let deadline = started + timeout;
        if let Err(e) = self.link.send_batch(id, self.taken, &records, &fds) {
            // Part of it may be on its way: the other process takes
            // nothing it was not told is its own.
            if self.link.send(&numbered(MINE, id), &[]).is_err() {
                self.link.close();
            }
            return Err(format!("could not send the batch: {e}"));
        }
        let answer = self.link.wait_for(
            deadline,
            |m| matches!(m, Incoming::Took(n) | Incoming::Refused(n, _) if *n == id),
        );
        match answer {
            Some(Incoming::Took(_)) => {
                // The point of no return for this batch.
                if let Err(e) = self.link.send(&numbered(YOURS, id), &[]) {
                    // It took the batch and never learnt it is its own: it
                    // has not served these users. Gone, its copies closed
                    // with it; alive, it must not wait for a decision that
                    // cannot come: the link ends, and it keeps nothing.
                    self.link.close();
                    return Err(format!(
                        "could not tell process {} the batch is its own ({e}); the link is closed",
                        self.peer
                    ));
                }
                self.moved_out += batch.len();
                tracing::debug!(
                    users = batch.len(),
                    fds = fds.len(),
                    ms = started.elapsed().as_secs_f64() * 1e3,
                    to = self.peer,
                    "batch handed over"
                );
                Ok(batch.len())
            }
            Some(Incoming::Refused(_, reason)) => {
                Err(format!("process {} refused the batch: {reason}", self.peer))
            }
            Some(Incoming::End(reason)) => Err(format!("process {} is gone: {reason}", self.peer)),
            Some(other) => Err(format!("process {} answered {other:?}", self.peer)),
            None => {
                if self.link.send(&numbered(MINE, id), &[]).is_err() {
                    // It must learn the batch is not its own: without this
                    // word, only the link's end says so.
                    self.link.close();
                }
                Err(format!(
                    "process {} did not take the batch within {} ms (Config::ready_timeout)",
                    self.peer,
                    timeout.as_millis()
                ))
            }
        }
    }

    /// Takes the batch that arrived: decodes its records (a refusal
    /// otherwise: the sender keeps its users), says `took`, and waits for the
    /// sender's decision, as long as the sender lives.
    pub(crate) fn take_batch<R: DeserializeOwned>(&mut self) -> Result<Arrived<R>, String> {
        let Received {
            id,
            seen,
            records,
            mut fds,
            came_ns,
        } = self
            .pending
            .take()
            .ok_or("no batch arrived (take users on Event::UsersArrived)")?;
        let records = match decode_batch::<R>(&records, fds.len()) {
            Ok(r) => r,
            Err(reason) => {
                let _ = self.link.send(&refusal(id, &reason), &[]);
                return Err(reason);
            }
        };
        let said = self.link.send(&numbered(TOOK, id), &[]);
        // The sender answers at once (it waits for this), or is gone: its
        // end, or a `took` that could not be sent, asks its pidfd.
        let decision = match said {
            Ok(()) => loop {
                let answer = self.link.wait_for(
                    Instant::now() + Duration::from_secs(1),
                    |m| matches!(m, Incoming::Yours(n) | Incoming::Mine(n) if *n == id),
                );
                if let Some(answer) = answer {
                    break answer;
                }
            },
            Err(e) => Incoming::End(format!("could not say `took` ({e})")),
        };
        match decision {
            Incoming::Yours(_) => {}
            Incoming::End(reason) if self.peer_is_gone(Duration::from_secs(5)) => {
                tracing::warn!(
                    peer = self.peer,
                    "process {} ended as it handed a batch over ({reason}): serving its users",
                    self.peer
                );
            }
            Incoming::End(reason) => {
                return Err(format!(
                    "the link to process {} ended and it lives: it keeps the batch ({reason})",
                    self.peer
                ));
            }
            _ => return Err(format!("process {} kept the batch", self.peer)),
        }
        let mut users = Vec::with_capacity(records.len());
        let mut rest = fds.drain(..);
        for (record, count) in records {
            users.push((record, rest.by_ref().take(count as usize).collect()));
        }
        self.moved_in += users.len();
        self.longest_batch_ns = self
            .longest_batch_ns
            .max(sys::monotonic_ns().saturating_sub(came_ns));
        if self.sent_log.front().is_some_and(|(n, _)| *n > seen + 1) {
            tracing::warn!(
                "more than {KEEP_SENT} forwarded messages were not acknowledged: the users that arrived may have missed some"
            );
        }
        let missed = self
            .sent_log
            .iter()
            .filter(|(n, _)| *n > seen)
            .map(|(_, m)| m.clone())
            .collect();
        Ok(Arrived { users, missed })
    }

    /// Forwards an application message to the other process.
    pub(crate) fn forward(&mut self, message: &[u8]) -> Result<(), String> {
        if self.link.ended() {
            // The window ends at the next poll: nobody to forward to.
            return Ok(());
        }
        if message.len() > MAX_FORWARD {
            return Err(format!(
                "a message of {} bytes; at most {MAX_FORWARD} are forwarded",
                message.len()
            ));
        }
        let mut bytes = Vec::with_capacity(4 + message.len());
        bytes.extend_from_slice(super::link::FWD.as_bytes());
        bytes.extend_from_slice(message);
        self.link
            .send(&bytes, &[])
            .map_err(|e| format!("could not forward to process {}: {e}", self.peer))?;
        self.sent += 1;
        self.sent_log.push_back((self.sent, message.to_vec()));
        if self.sent_log.len() > KEEP_SENT {
            self.sent_log.pop_front();
        }
        Ok(())
    }

    /// Whether the other process is gone (after its link ended), asked for
    /// up to `limit`.
    fn peer_is_gone(&self, limit: Duration) -> bool {
        match &self.side {
            Side::New { arrival } => arrival.old_is_gone(limit),
            Side::Old { newcomer } => newcomer.is_gone(limit),
        }
    }

    /// This process has no users left to move: it tells the other one and
    /// exits (the old process: the migration is complete; the new one:
    /// everyone is back). Requests that reached it meanwhile go to the other
    /// process, as after a whole migration. Returns the window if the other
    /// process cannot be told (its link ended): this process then serves on.
    pub(crate) fn finish(self, requests: &Requests, reporter: &Reporter) -> Window {
        if self.link.ended() {
            return self;
        }
        let peer = self.peer;
        // systemd's status line, which both processes write, hears this
        // one first (one datagram): the other process answers `done` with
        // its own.
        crate::status::announce_migrated(peer);
        if self.link.send(DONE, &[]).is_err() {
            // Gone meanwhile: this process serves on (its next outcome
            // says so).
            return self;
        }
        match self.side {
            Side::Old { newcomer } => {
                let link = self.link;
                departure::leave_with(newcomer, requests, reporter, self.stay, move || {
                    link.wait_for(Instant::now() + Duration::from_secs(1), |m| {
                        matches!(m, Incoming::Joined)
                    });
                })
            }
            Side::New { arrival } => {
                departure::pass_on(Some(arrival.old_pidfd()), peer, requests);
                crate::status::report(Outcome::Migrated { to: peer }, reporter);
                std::process::exit(0)
            }
        }
    }

    /// The new process, at the old one's `done`: into its process group,
    /// then `joined` (the old process waits for it before it exits).
    pub(crate) fn join_old_group(&self) {
        if let Side::New { arrival } = &self.side {
            arrival.join_old_group();
        }
    }

    /// The window is over: the link is closed, and the new process's
    /// arrival (for its outcome) handed back. The old process lets a new
    /// process that lives go (`keep_newcomer`): it serves its users on its
    /// own; one that is gone is reaped.
    pub(crate) fn close(self, keep_newcomer: bool) -> Option<Box<super::Arrival>> {
        self.link.close();
        match self.side {
            Side::New { arrival } => Some(arrival),
            Side::Old { mut newcomer } => {
                if keep_newcomer {
                    newcomer.let_go();
                }
                None
            }
        }
    }
}

/// The records of a batch, checked against the descriptors that came.
fn decode_batch<R: DeserializeOwned>(records: &[u8], fds: usize) -> Result<Vec<(R, u32)>, String> {
    let raw: Vec<(Vec<u8>, u32)> = postcard::from_bytes(records)
        .map_err(|e| format!("the batch's records do not decode: {e}"))?;
    let want: usize = raw.iter().map(|(_, n)| *n as usize).sum();
    if want != fds {
        return Err(format!("the batch names {want} descriptors but {fds} came"));
    }
    raw.into_iter()
        .map(|(bytes, n)| {
            crate::snapshot::decode_state::<R>(&bytes, 0)
                .map(|r| (r, n))
                .map_err(|e| format!("a user's record does not decode as this build's: {e}"))
        })
        .collect()
}
