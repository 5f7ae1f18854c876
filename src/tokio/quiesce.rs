//! Pausing every connection task at a safe point for the commit
//! ([`Quiesce`], [`SafePoint`]), for a bounded time ([`Unpaused`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::*;

/// Pauses the tasks that joined it, each at a safe point of its own, and
/// collects what they hand back: a `T` per task, typically the socket and
/// the per-connection state (unread input, unsent output).
///
/// A pause asks the idle tasks first: a task that served in the last
/// [`BUSY`] (it called [`SafePoint::requested`] again) runs on until every
/// idle one has stopped, so that the clients being served now stop last and
/// wait the least. Its copy comes first in what the pause returns, and the
/// new image restores it first.
///
/// A pause is bounded: a task that does not reach a safe point in time (it
/// waits outside one: a write to a client that stopped reading, a lock)
/// ends the pause with [`Unpaused`], which names it; the upgrade is then
/// abandoned ([`Copyover::abandon`]) and every task goes on from where it
/// was. One slow client never stops the others.
///
/// Clone it freely; every clone is the same quiesce.
#[derive(Debug)]
pub struct Quiesce<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for Quiesce<T> {
    fn clone(&self) -> Self {
        Quiesce {
            inner: Arc::clone(&self.inner),
        }
    }
}

/// Whether a pause is asked for, and its number: a task that a pause did
/// not grant its safe point waits for the next pause by its number (a
/// pause that ends and the next that starts at once could be missed by
/// watching for the end).
#[derive(Debug, Clone, Copy, Default)]
struct Pause {
    on: bool,
    number: u64,
    /// Every task is asked now, the busy ones too.
    all: bool,
}

/// A task that called [`SafePoint::requested`] within this time before a
/// pause (it served a client) is asked to stop only once every idle task
/// has stopped.
pub const BUSY: Duration = Duration::from_millis(20);

/// How long [`Quiesce::pause`] waits by default for the last task.
pub const PAUSE_LIMIT: Duration = Duration::from_millis(500);

#[derive(Debug)]
struct Inner<T> {
    tally: Mutex<Tally<T>>,
    /// Whether a pause is asked for, and which.
    paused: watch::Sender<Pause>,
    /// How many pauses have ended: a task that holds in place
    /// ([`SafePoint::hold`]) waits for the next end.
    ended: watch::Sender<u64>,
    /// The number of the last pause in which every task stopped: the tasks
    /// that hold make their copies then, and not before (a task still
    /// running could write to one that copied itself already).
    sealed: watch::Sender<u64>,
    /// Wakes `pause` when a task parked or left.
    changed: Notify,
    limit: Duration,
    /// What the tasks' last calls of [`SafePoint::requested`] are timed
    /// from.
    epoch: std::time::Instant,
}

#[derive(Debug)]
struct Tally<T> {
    /// Tasks that joined and have not parked or left, by their number.
    live: std::collections::BTreeMap<u64, Option<String>>,
    /// Tasks that hold in place ([`SafePoint::hold`]) until the pause
    /// ends; live again when it does.
    held: std::collections::BTreeMap<u64, Option<String>>,
    /// The copies the holding tasks made once the pause was sealed (by
    /// task), and how many of them answered (a copy, or a refusal in
    /// `declined`).
    copies: Vec<(u64, T)>,
    answered: usize,
    /// The holding tasks that could not make their copy.
    declined: Vec<String>,
    /// Of those, the ones whose safe point was granted (they park next).
    granted: usize,
    /// Whether a pause may still grant safe points: false once it ended.
    granting: bool,
    /// The pause under way (or the last one), and when it started (in
    /// microseconds from `epoch`).
    number: u64,
    started_us: u64,
    /// Whether the pause asks the busy tasks too.
    all: bool,
    /// The busy tasks that asked for their safe point before `all`: they
    /// run on; always live ones.
    deferred: std::collections::BTreeSet<u64>,
    /// Every task that was busy in this pause: its copy comes first.
    busy: std::collections::BTreeSet<u64>,
    next: u64,
    parked: Vec<(u64, T)>,
}

impl<T> Tally<T> {
    /// Whether every task that still runs is a busy one waiting for `all`
    /// (and there is one: otherwise the pause seals at once).
    fn idle_stopped(&self) -> bool {
        !self.all && !self.deferred.is_empty() && self.live.len() == self.deferred.len()
    }

    /// What the tasks handed back, the busy tasks' first.
    fn take_items(&mut self) -> Vec<T> {
        let mut items = std::mem::take(&mut self.parked);
        items.append(&mut self.copies);
        let (mut first, rest): (Vec<_>, Vec<_>) = items
            .into_iter()
            .partition(|(id, _)| self.busy.contains(id));
        first.extend(rest);
        first.into_iter().map(|(_, item)| item).collect()
    }
}

impl<T> Inner<T> {
    /// Microseconds since `epoch`.
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn tally(&self) -> MutexGuard<'_, Tally<T>> {
        // A panic while holding this lock leaves consistent counts.
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Task `id` leaves (parked, or ended); the last one of a pause, or
    /// the last granted one of an abandoned pause, wakes `pause` (once,
    /// not once per task: the pausing task is on the main thread, and
    /// waking it a thousand times costs a thousand thread switches).
    fn leave(&self, mut tally: MutexGuard<'_, Tally<T>>, id: u64, granted: bool) {
        tally.live.remove(&id);
        tally.held.remove(&id);
        tally.deferred.remove(&id);
        if granted {
            tally.granted = tally.granted.saturating_sub(1);
        }
        let wake = tally.live.is_empty() || (granted && tally.granted == 0) || tally.idle_stopped();
        drop(tally);
        if wake {
            self.changed.notify_one();
        }
    }
}

impl<T> Default for Quiesce<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// A pause that ended before every task parked: the upgrade cannot go on.
/// Spawn the tasks of [`parked`](Self::parked) again (as after a failed
/// commit), and abandon the upgrade with this as the reason
/// ([`Copyover::abandon`]); the other tasks never stopped.
#[derive(Debug)]
#[non_exhaustive]
pub struct Unpaused<T> {
    /// What the tasks that did park handed back.
    pub parked: Vec<T>,
    /// The tasks that did not reach a safe point in time: their names
    /// ([`Quiesce::join_as`]), or `task N`.
    pub running: Vec<String>,
    /// How long the pause waited.
    pub waited: Duration,
}

impl<T> std::fmt::Display for Unpaused<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 10;
        write!(
            f,
            "{} task(s) did not reach a safe point within {} ms (waiting outside one: a write \
             to a client that does not read, a lock): {}",
            self.running.len(),
            self.waited.as_millis(),
            self.running[..self.running.len().min(SHOWN)].join(", ")
        )?;
        if self.running.len() > SHOWN {
            write!(f, " and {} more", self.running.len() - SHOWN)?;
        }
        Ok(())
    }
}

impl<T: std::fmt::Debug> std::error::Error for Unpaused<T> {}

impl<T> Quiesce<T> {
    /// A quiesce that no task has joined, whose pauses wait
    /// [`PAUSE_LIMIT`] at most.
    pub fn new() -> Self {
        Self::with_limit(PAUSE_LIMIT)
    }

    /// A quiesce whose pauses wait `limit` at most for the last task.
    pub fn with_limit(limit: Duration) -> Self {
        Quiesce {
            inner: Arc::new(Inner {
                tally: Mutex::new(Tally {
                    live: std::collections::BTreeMap::new(),
                    held: std::collections::BTreeMap::new(),
                    copies: Vec::new(),
                    answered: 0,
                    declined: Vec::new(),
                    granted: 0,
                    granting: false,
                    number: 0,
                    started_us: 0,
                    all: false,
                    deferred: std::collections::BTreeSet::new(),
                    busy: std::collections::BTreeSet::new(),
                    next: 0,
                    parked: Vec::new(),
                }),
                paused: watch::Sender::new(Pause::default()),
                ended: watch::Sender::new(0),
                sealed: watch::Sender::new(0),
                changed: Notify::new(),
                limit,
                epoch: std::time::Instant::now(),
            }),
        }
    }

    /// Enrols one more task. Call it **before** spawning the task, and move
    /// the [`SafePoint`] into it: a task that joins only once it runs could
    /// be missed by a pause that starts meanwhile, and then run on while
    /// the commit hands its socket over.
    pub fn join(&self) -> SafePoint<T> {
        self.enrol(None)
    }

    /// [`join`](Self::join), with a name that [`Unpaused`] gives if this
    /// task does not reach a safe point in time (a peer's address, a
    /// user's name).
    pub fn join_as(&self, name: impl Into<String>) -> SafePoint<T> {
        self.enrol(Some(name.into()))
    }

    fn enrol(&self, name: Option<String>) -> SafePoint<T> {
        let mut tally = self.inner.tally();
        let id = tally.next;
        tally.next += 1;
        tally.live.insert(id, name);
        drop(tally);
        SafePoint {
            inner: Arc::clone(&self.inner),
            paused: self.inner.paused.subscribe(),
            id,
            granted: AtomicBool::new(false),
            last_call_us: AtomicU64::new(0),
            left: false,
        }
    }

    /// Tasks that joined and have neither parked nor left.
    pub fn running(&self) -> usize {
        self.inner.tally().live.len()
    }

    /// Asks every joined task to stop at its next safe point (the idle ones
    /// first, then the [`BUSY`] ones), waits until each one parked (or
    /// ended: a closed connection), and returns what they handed back, the
    /// busy tasks' first. Tasks that join while the pause lasts are asked
    /// too (with the busy ones: a task that just asked counts as busy).
    ///
    /// The busy tasks are asked at the latest at a quarter of the limit:
    /// they have the rest of it to stop. A task that [`park`](SafePoint::park)s
    /// hands its state over at once, while the busy tasks may still run and
    /// write to it (to its inbox, say): drain such inboxes from what `pause`
    /// returns, or [`hold`](SafePoint::hold), whose copy is made only once
    /// every task has stopped.
    ///
    /// Dropping the returned future before it completes ends the pause, as
    /// [`resume`](Self::resume) does. It needs tokio's timer ([`runtime`]
    /// enables it).
    ///
    /// # Errors
    ///
    /// [`Unpaused`] if some task has not reached a safe point within the
    /// limit ([`PAUSE_LIMIT`], or [`with_limit`](Self::with_limit)'s): the
    /// pause ends (tasks still running are no longer asked to stop), and
    /// it holds what the tasks that parked handed back. Abandon the
    /// upgrade and spawn those tasks again.
    pub async fn pause(&self) -> Result<Vec<T>, Unpaused<T>> {
        let started = std::time::Instant::now();
        let limit = self.inner.limit;
        let mut deadline = ::tokio::time::Instant::from_std(started + limit);
        // Dropped before the pause ends (cancelled in a `select!`, say):
        // the pause ends as after a failed commit.
        let mut guard = EndOnDrop(self, true);
        let number = {
            let mut tally = self.inner.tally();
            tally.granting = true;
            tally.all = false;
            tally.deferred.clear();
            tally.busy.clear();
            tally.number = self.inner.paused.borrow().number + 1;
            tally.started_us = self.inner.now_us();
            tally.number
        };
        self.inner.paused.send_modify(|p| {
            p.on = true;
            p.number = number;
            p.all = false;
        });
        // The busy tasks are asked once every idle one stopped, or at a
        // quarter of the limit (an idle task that does not stop would
        // otherwise keep them from their safe points too).
        let ask_all_at = ::tokio::time::Instant::from_std(started + limit / 4);
        let mut all = false;
        let mut late = false;
        let mut sealed = false;
        // The tasks that had not reached a safe point at the limit (the
        // held ones, released by `end` then, are live again but not these).
        let mut at_limit = std::collections::BTreeSet::new();
        loop {
            let changed = self.inner.changed.notified();
            {
                let mut tally = self.inner.tally();
                if !all && !late && tally.idle_stopped() {
                    all = true;
                    self.ask_all(tally);
                    continue;
                }
                if tally.live.is_empty() && !late && !sealed {
                    // Every task stopped: the holding ones copy themselves
                    // now, none of them can be written to any more.
                    sealed = true;
                    // Nobody runs: a task that joins now is not deferred.
                    tally.all = true;
                    all = true;
                    self.inner.sealed.send_replace(number);
                }
                // (`>=`: a holding task that answered may have ended since;
                // `live`: a task that joined since holds too before this.)
                if sealed && tally.live.is_empty() && tally.answered >= tally.held.len() {
                    if !tally.declined.is_empty() {
                        let declined = std::mem::take(&mut tally.declined);
                        let mut unpaused = self.unpaused(&mut tally, started, &at_limit);
                        unpaused.running = declined;
                        drop(tally);
                        // `guard` ends the pause: the holders go on.
                        return Err(unpaused);
                    }
                    // Safe points are still granted until `resume`: a task
                    // that joins now parks for the next pause.
                    guard.1 = false;
                    tracing::debug!(
                        parked = tally.parked.len(),
                        held = tally.copies.len(),
                        busy = tally.busy.len(),
                        pause_ms = started.elapsed().as_secs_f64() * 1e3,
                        "every task parked or held"
                    );
                    return Ok(tally.take_items());
                }
                if late && tally.granted == 0 {
                    // The tasks granted a safe point have parked; the
                    // others go on as they were.
                    guard.1 = false;
                    return Err(self.unpaused(&mut tally, started, &at_limit));
                }
            }
            let wake_at = if all { deadline } else { ask_all_at };
            if ::tokio::time::timeout_at(wake_at, changed).await.is_err() {
                if !all && !late {
                    all = true;
                    self.ask_all(self.inner.tally());
                    continue;
                }
                if late {
                    // A task granted its safe point did not park within
                    // another limit (it awaited something between
                    // `requested` and `park`): what it hands back goes to
                    // the next pause.
                    tracing::warn!("a task granted its safe point did not park in time");
                    guard.1 = false;
                    return Err(self.unpaused(&mut self.inner.tally(), started, &at_limit));
                }
                // No safe point is granted from now on; a task that was
                // granted one parks at once (it called `requested`).
                late = true;
                deadline += limit;
                at_limit = self.inner.tally().live.keys().copied().collect();
                self.end();
            }
        }
    }

    /// What a pause that ended without every task comes to.
    fn unpaused(
        &self,
        tally: &mut Tally<T>,
        started: std::time::Instant,
        at_limit: &std::collections::BTreeSet<u64>,
    ) -> Unpaused<T> {
        let running = tally
            .live
            .iter()
            .filter(|(id, _)| at_limit.contains(id))
            .map(|(id, name)| name.clone().unwrap_or_else(|| format!("task {id}")))
            .collect();
        Unpaused {
            parked: std::mem::take(&mut tally.parked)
                .into_iter()
                .map(|(_, item)| item)
                .collect(),
            running,
            waited: started.elapsed(),
        }
    }

    /// The busy tasks are asked too: the second step of a pause.
    fn ask_all(&self, mut tally: MutexGuard<'_, Tally<T>>) {
        tally.all = true;
        tally.deferred.clear();
        tracing::debug!(
            busy = tally.busy.len(),
            idle_ms = (self.inner.now_us().saturating_sub(tally.started_us)) as f64 / 1e3,
            "the idle tasks stopped; asking the busy ones"
        );
        drop(tally);
        self.inner.paused.send_modify(|p| p.all = true);
    }

    /// No safe point is granted any more, no task is asked to stop, and
    /// the tasks that hold in place are live again and go on (their copies,
    /// not taken by a `pause` that returned, are dropped: stale).
    fn end(&self) {
        let mut tally = self.inner.tally();
        tally.granting = false;
        tally.deferred.clear();
        let held = std::mem::take(&mut tally.held);
        tally.live.extend(held);
        tally.copies.clear();
        tally.answered = 0;
        tally.declined.clear();
        // Under the tally's lock: a task that holds reads the count there.
        self.inner.ended.send_modify(|n| *n += 1);
        drop(tally);
        self.inner.paused.send_modify(|p| {
            p.on = false;
            p.all = false;
        });
    }

    /// Ends the pause: tasks that join from now on run until the next one,
    /// and the tasks that hold in place ([`SafePoint::hold`]) go on. Call
    /// it after a failed commit (then spawn again the tasks that parked,
    /// from what [`pause`](Self::pause) returned). A pause that ended with
    /// [`Unpaused`] has ended already.
    pub fn resume(&self) {
        self.end();
    }
}

/// Ends a pause whose future is dropped before it returned (`.1`: still
/// to do).
struct EndOnDrop<'a, T>(&'a Quiesce<T>, bool);

impl<T> Drop for EndOnDrop<'_, T> {
    fn drop(&mut self) {
        if self.1 {
            self.0.end();
        }
    }
}

/// One task's enrolment in a [`Quiesce`]: it learns there when to stop,
/// and hands back its socket and state with [`park`](Self::park). Dropping
/// it (the connection ended) takes the task out of the count.
#[derive(Debug)]
pub struct SafePoint<T> {
    inner: Arc<Inner<T>>,
    paused: watch::Receiver<Pause>,
    id: u64,
    /// The pause granted this task its safe point: it parks next.
    granted: AtomicBool,
    /// When this task last called [`requested`](Self::requested), in
    /// microseconds from the quiesce's epoch (set before it asks for its
    /// safe point: `grant` never reads it unset).
    last_call_us: AtomicU64,
    left: bool,
}

/// What a task asking for its safe point gets.
enum Grant {
    Granted,
    /// It is busy and the pause asks the idle tasks first: it runs on
    /// until this pause asks every task.
    Deferred(u64),
    /// The pause ended.
    Ended,
}

impl<T> SafePoint<T> {
    /// Completes when a pause is asked for (at once if one is under way),
    /// and grants this task its safe point: [`park`](Self::park) right
    /// after, with no `.await` in between. Cancel-safe: put it in the
    /// task's `select!` loop, beside the reads and writes.
    pub async fn requested(&self) {
        self.last_call_us
            .store(self.inner.now_us(), Ordering::Relaxed);
        let mut paused = self.paused.clone();
        let mut missed = None;
        let mut deferred = None;
        loop {
            // The value's guard is dropped with this statement: the
            // future stays `Send`.
            let waited = paused
                .wait_for(|p| {
                    // Deferred in pause `d`: until `d` asks every task or a
                    // later pause starts (the tally may count a pause
                    // before this channel shows it).
                    let asked = deferred.is_none_or(|d| p.number > d || (p.number == d && p.all));
                    p.on && Some(p.number) != missed && asked
                })
                .await
                .map(|p| p.number);
            let Ok(number) = waited else {
                // Every `Quiesce` was dropped: no pause will ever come.
                return std::future::pending().await;
            };
            match self.grant() {
                Grant::Granted => return,
                // Busy: wait until this pause asks every task.
                Grant::Deferred(number) => deferred = Some(number),
                // This pause ended before granting us: wait for the next one.
                Grant::Ended => missed = Some(number),
            }
        }
    }

    /// Takes this task's safe point in the pause under way, if that pause
    /// still grants them (it did not end), and asks every task or this one
    /// is idle.
    fn grant(&self) -> Grant {
        let mut tally = self.inner.tally();
        // Under the tally's lock, as every change of it.
        if self.granted.load(Ordering::SeqCst) {
            return Grant::Granted;
        }
        if !tally.granting {
            return Grant::Ended;
        }
        let last_call = self.last_call_us.load(Ordering::Relaxed);
        let busy_since = tally.started_us.saturating_sub(BUSY.as_micros() as u64);
        if !tally.all && last_call >= busy_since {
            tally.deferred.insert(self.id);
            tally.busy.insert(self.id);
            let number = tally.number;
            let wake = tally.idle_stopped();
            drop(tally);
            if wake {
                self.inner.changed.notify_one();
            }
            return Grant::Deferred(number);
        }
        tally.granted += 1;
        self.granted.store(true, Ordering::SeqCst);
        Grant::Granted
    }

    /// Whether a pause is asked for now.
    pub fn is_requested(&self) -> bool {
        self.paused.borrow().on
    }

    /// Holds this task in place for the pause under way: once every task
    /// has stopped (parked, held, or ended), calls `copy` (a copy of the
    /// task's state: its record, its buffered bytes, a duplicate of its
    /// socket; `None` if it cannot make one, which ends the pause without
    /// an upgrade) and hands it to the pausing task, then waits until the
    /// pause ends. If the commit happens, it never does; if not, the task
    /// goes on from where it was, with everything it had. Call it right
    /// after [`requested`](Self::requested), and await it to its end (do not
    /// race it in a `select!`: while it waits, the main task may hand the
    /// socket to a new image). If the pause ended before this task held
    /// (its limit passed), it returns at once and `copy` is not called.
    ///
    /// The copy is made only once no task runs: a task still running could
    /// write into this one's inbox after it copied itself, and that write
    /// would not cross the upgrade.
    pub async fn hold(&self, copy: impl FnOnce() -> Option<T>) {
        let mut ended = self.inner.ended.subscribe();
        let mut sealed = self.inner.sealed.subscribe();
        let number = self.paused.borrow().number;
        let (seen, name) = {
            let mut tally = self.inner.tally();
            let granted = self.granted.swap(false, Ordering::SeqCst);
            if granted {
                tally.granted = tally.granted.saturating_sub(1);
            }
            if !tally.granting {
                // The pause ended before this task held: go on.
                let wake = granted && tally.granted == 0;
                drop(tally);
                if wake {
                    self.inner.changed.notify_one();
                }
                return;
            }
            let name = tally.live.remove(&self.id).flatten();
            tally.deferred.remove(&self.id);
            tally.held.insert(self.id, name.clone());
            let wake =
                tally.live.is_empty() || (granted && tally.granted == 0) || tally.idle_stopped();
            // Read under the lock `end` takes: no end is missed.
            let seen = *ended.borrow_and_update();
            drop(tally);
            if wake {
                self.inner.changed.notify_one();
            }
            (seen, name)
        };
        let sealed_now = ::tokio::select! {
            _ = sealed.wait_for(|n| *n == number) => true,
            _ = ended.wait_for(|n| *n != seen) => false,
        };
        if !sealed_now {
            return;
        }
        let item = copy();
        {
            let mut tally = self.inner.tally();
            if *ended.borrow() != seen {
                // The pause ended while the copy was made: it is stale.
                return;
            }
            match item {
                Some(item) => tally.copies.push((self.id, item)),
                None => tally
                    .declined
                    .push(name.unwrap_or_else(|| format!("task {}", self.id))),
            }
            tally.answered += 1;
            let wake = tally.answered >= tally.held.len();
            drop(tally);
            if wake {
                self.inner.changed.notify_one();
            }
        }
        if ended.wait_for(|n| *n != seen).await.is_err() {
            // Every `Quiesce` is gone: no pause will end, nor come.
            std::future::pending::<()>().await;
        }
    }

    /// Hands the task's socket and state back to the pausing task. The task
    /// should end right after: the main task owns them now.
    pub fn park(mut self, item: T) {
        let mut tally = self.inner.tally();
        tally.parked.push((self.id, item));
        self.left = true;
        self.inner
            .leave(tally, self.id, self.granted.load(Ordering::SeqCst));
    }
}

impl<T> Drop for SafePoint<T> {
    fn drop(&mut self) {
        if !self.left {
            let granted = self.granted.load(Ordering::SeqCst);
            self.inner.leave(self.inner.tally(), self.id, granted);
        }
    }
}
