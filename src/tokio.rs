//! tokio servers (feature `tokio`): the runtime's events as an `async fn`,
//! inherited sockets as tokio sockets, and a way to pause every connection
//! task at a safe point for the commit.
//!
//! A tokio server keeps its state spread over tasks: one per connection,
//! each owning its socket, its unread input and its unsent output. An
//! upgrade needs all of that in one place for a moment, on one thread,
//! while no other thread touches a kept socket. This module does it in
//! three steps, with no `unsafe` in the server:
//!
//! 1. [`Event::Upgrade`] (from [`AsyncCopyover::next_event`]): start the
//!    probe with [`AsyncCopyover::upgrade`] and the state as the main task
//!    has it. Nothing pauses: the probe runs beside the server.
//! 2. [`Event::UpgradeApproved`]: [`Quiesce::pause`] asks every task that
//!    holds a [`SafePoint`] to stop at its next safe point and hand back
//!    its socket and per-connection state ([`SafePoint::park`]); it returns
//!    them all. Build the state and the [`Handoff`] from
//!    them and call [`AsyncCopyover::upgrade`] again: it commits and, on
//!    success, never returns. A pause is bounded ([`PAUSE_LIMIT`]): if a
//!    task waits outside its safe point (a write to a client that stopped
//!    reading), it ends with [`Unpaused`], which names that task; abandon
//!    the upgrade ([`Copyover::abandon`]) and spawn again the tasks that
//!    did park. Nobody waits on the slow one. (It uses tokio's timer:
//!    [`runtime`] enables it.)
//! 3. If the commit fails, it returns the error and the old image serves
//!    on: [`Quiesce::resume`], then spawn the tasks again from what they
//!    handed back, the same way the new image starts them from the
//!    inherited state.
//!
//! # The shape of `main`
//!
//! [`boot`](crate::boot) must run before any thread starts, so before the
//! runtime is built: no `#[tokio::main]`, but a `main` that boots, then
//! builds the runtime with [`runtime`] and runs the server in `block_on`.
//! The main task (the future given to `block_on`) must be the one that
//! commits: it runs on the process's main thread, the only thread that
//! receives the reload signals (see below).
//!
//! ```no_run
//! use copyover::tokio::{AsyncCopyover, Quiesce, TakeTokio};
//! use copyover::{AppState, Config, Event, Handoff, Start};
//! # #[derive(serde::Serialize, serde::Deserialize, Default)]
//! # struct State { names: Vec<String> }
//! # impl AppState for State { const VERSION: u32 = 1; }
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let (co, start) = copyover::boot::<State>(Config::new("app", "v1"))?;
//!     copyover::tokio::runtime()?.block_on(async move {
//!         let mut co = AsyncCopyover::new(co)?;
//!         let listener = match start {
//!             Start::Fresh => tokio::net::TcpListener::bind("127.0.0.1:7000").await?,
//!             Start::Resumed { state, mut fds } => {
//!                 // Take the connections here too; spawn their tasks
//!                 // only after `ready`.
//!                 fds.take_tokio_tcp_listener("listener")?.ok_or("no listener")?
//!             }
//!         };
//!         co.ready()?;
//!         let quiesce: Quiesce<tokio::net::TcpStream> = Quiesce::new();
//!         loop {
//!             tokio::select! {
//!                 accepted = listener.accept() => {
//!                     let (stream, _) = accepted?;
//!                     let mut safe_point = quiesce.join();
//!                     tokio::spawn(async move {
//!                         // ... serve, and at a safe point:
//!                         safe_point.requested().await;
//!                         safe_point.park(stream);
//!                     });
//!                 }
//!                 event = co.next_event() => match event {
//!                     Event::Upgrade => {
//!                         let mut keep = Handoff::new();
//!                         keep.listener("listener", &listener);
//!                         let _ = co.upgrade(&State::default(), &keep);
//!                     }
//!                     Event::UpgradeApproved => {
//!                         let parked = match quiesce.pause().await {
//!                             Ok(parked) => parked,
//!                             // A task did not reach a safe point in time.
//!                             Err(unpaused) => {
//!                                 co.abandon(&unpaused.to_string());
//!                                 // ... spawn the tasks again from
//!                                 // `unpaused.parked`.
//!                                 continue;
//!                             }
//!                         };
//!                         let mut keep = Handoff::new();
//!                         keep.listener("listener", &listener);
//!                         for (i, s) in parked.iter().enumerate() {
//!                             keep.stream(format!("conn:{i}"), s);
//!                         }
//!                         // Returns only if the commit failed.
//!                         let _ = co.upgrade(&State::default(), &keep);
//!                         quiesce.resume();
//!                         // ... spawn the tasks again from `parked`.
//!                     }
//!                     Event::Shutdown => return Ok(()),
//!                     _ => {}
//!                 },
//!             }
//!         }
//!     })
//! }
//! ```
//!
//! # Resuming a thousand connections quickly
//!
//! Take the connections with the std takes ([`Inherited::take_tcp_stream`]:
//! the type checks, before [`Copyover::ready`]) and turn each into a tokio
//! socket (`TcpStream::from_std`) inside its own task, after `ready`.
//! tokio registers every socket for writability, and a connected socket is
//! writable at once: registered from the main thread, each one wakes the
//! runtime thread that waits in `epoll_wait`, a thread switch per client
//! inside the blackout. From the tasks, the registrations run on busy
//! workers, in parallel, after the blackout. [`TakeTokio`] suits listeners
//! and the odd socket.
//!
//! # Signals in a multi-threaded process
//!
//! The commit blocks the reload signals ([`HELD_SIGNALS`]) in the thread
//! that executes the new binary: the mask and the pending signals of that
//! thread, and the signals pending for the process, survive `execve`. A
//! signal that the kernel hands to *another* thread during the commit runs
//! the handler there, sets a flag that the exec then forgets: lost. So no
//! other thread may take them: [`runtime`] (or [`mask_held_signals`] in
//! your own builder's `on_thread_start`) blocks them in every worker and
//! blocking-pool thread, and [`AsyncCopyover::upgrade`] blocks them while
//! the probe's helper thread is created. The main thread alone handles
//! them; once it blocks them for the commit, a signal stays pending for
//! the process and reaches the new image.
//!
//! [`HELD_SIGNALS`]: crate::signal::HELD_SIGNALS

use std::io;
use std::net;
use std::ops::{Deref, DerefMut};
use std::os::fd::OwnedFd;
use std::os::unix::net as unix;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ::tokio::sync::{Notify, watch};

use crate::error::{Error, UpgradeError};
use crate::handoff::{Handoff, Inherited, SocketKind};
use crate::runtime::{Copyover, Event};
use crate::state::AppState;
use crate::upgrade::Progress;

/// Blocks [`HELD_SIGNALS`](crate::signal::HELD_SIGNALS) in the calling
/// thread, for good. Give it to `Builder::on_thread_start` if you build
/// your own runtime (what [`runtime_builder`] does), and call it first in
/// any thread you spawn yourself: only the main thread may handle the
/// reload signals.
pub fn mask_held_signals() {
    // Cannot fail with a valid `how` and set.
    let _ = crate::sys::block_signals(&crate::signal::HELD_SIGNALS);
}

/// The held signals blocked in this thread until dropped; the previous mask
/// is then put back.
struct Masked(Option<crate::sys::SavedMask>);

impl Masked {
    fn now() -> Masked {
        Masked(crate::sys::block_signals(&crate::signal::HELD_SIGNALS).ok())
    }
}

impl Drop for Masked {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = crate::sys::restore_mask(old);
        }
    }
}

/// A multi-threaded runtime builder (`enable_all`) whose worker and
/// blocking-pool threads block the held signals (see the module docs).
/// Add your own settings, then build it with [`build_runtime`].
pub fn runtime_builder() -> ::tokio::runtime::Builder {
    let mut b = ::tokio::runtime::Builder::new_multi_thread();
    b.enable_all().on_thread_start(mask_held_signals);
    b
}

/// Builds [`runtime_builder`]'s runtime. Call it after
/// [`boot`](crate::boot), in the main thread.
///
/// # Errors
///
/// The runtime's own error if its threads or its I/O driver cannot be set
/// up.
pub fn runtime() -> io::Result<::tokio::runtime::Runtime> {
    build_runtime(&mut runtime_builder())
}

/// Builds `builder`'s runtime (from [`runtime_builder`], with your
/// settings) with the held signals blocked in the calling thread: threads
/// inherit the creating thread's mask, so the runtime's threads never run a
/// moment with the signals unblocked, not even before `on_thread_start`.
///
/// # Errors
///
/// The runtime's own error.
pub fn build_runtime(
    builder: &mut ::tokio::runtime::Builder,
) -> io::Result<::tokio::runtime::Runtime> {
    let _masked = Masked::now();
    builder.build()
}

/// A [`Copyover`] whose events are awaited: owned and `'static`, to keep
/// in the main task. It dereferences to the [`Copyover`] for everything
/// else ([`ready`](Copyover::ready), [`generation`](Copyover::generation),
/// ...).
pub struct AsyncCopyover<S> {
    co: Copyover<S>,
    /// A duplicate of [`Copyover::event_fd`] (the read end of the runtime's
    /// wake-up socket pair), registered with tokio as a Unix stream: safe
    /// code all the way, where an `AsyncFd` over a raw descriptor would
    /// need `unsafe`.
    wake: ::tokio::net::UnixStream,
}

impl<S> std::fmt::Debug for AsyncCopyover<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncCopyover")
            .field("co", &self.co)
            .finish_non_exhaustive()
    }
}

impl<S> AsyncCopyover<S> {
    /// Registers the runtime's event descriptor with tokio's reactor. Call
    /// it inside the runtime.
    ///
    /// # Errors
    ///
    /// If the descriptor cannot be duplicated or registered (no runtime).
    pub fn new(co: Copyover<S>) -> io::Result<AsyncCopyover<S>> {
        let fd: OwnedFd = co.event_fd().try_clone_to_owned()?;
        // Non-blocking already: the flag lives on the shared file description.
        let wake = ::tokio::net::UnixStream::from_std(unix::UnixStream::from(fd))?;
        Ok(AsyncCopyover { co, wake })
    }

    /// The next event. Cancel-safe: an event is taken only when this
    /// returns it, so it fits a `tokio::select!` loop.
    ///
    /// Every poll of the returned future asks the runtime first, so in a
    /// `biased` select an event whose signal was handled before anything
    /// else woke the task comes before that other thing.
    pub async fn next_event(&mut self) -> Event {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Event> {
        use std::task::Poll;
        loop {
            if let Some(event) = self.co.poll() {
                return Poll::Ready(event);
            }
            match self.wake.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                // The reactor is gone (the runtime shuts down): nothing
                // will wake us again.
                Poll::Ready(Err(_)) => return Poll::Pending,
                Poll::Ready(Ok(())) => {}
            }
            // Drained through tokio's registration, so that tokio clears its
            // readiness on `WouldBlock`; then the runtime is asked again: a
            // wake-up byte that came meanwhile is seen by that poll, a later
            // one makes the socket ready again.
            let mut buf = [0u8; 256];
            loop {
                match self.wake.try_read(&mut buf) {
                    Ok(n) if n > 0 => {}
                    // EOF cannot happen while the runtime lives (it holds
                    // the other end); were it to, nothing would wake us.
                    Ok(_) => return Poll::Pending,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
    }

    /// [`Copyover::upgrade`], with the held signals blocked in this thread
    /// while it runs, so that the probe's helper thread starts with them
    /// blocked (only the main thread may handle them). Call it from the
    /// main task: on [`Event::Upgrade`] with the state as you have it (the
    /// probe checks that the new binary reads it), on
    /// [`Event::UpgradeApproved`] with the state and the sockets that
    /// [`Quiesce::pause`] collected. A commit does not return on success.
    ///
    /// # Errors
    ///
    /// As [`Copyover::upgrade`]: the old image keeps serving.
    pub fn upgrade(&mut self, state: &S, keep: &Handoff<'_>) -> Result<Progress, UpgradeError>
    where
        S: AppState,
    {
        if !crate::sys::on_main_thread() {
            tracing::warn!(
                "upgrade called off the main thread: a signal that the main thread takes during \
                 the commit is lost; call it from the task given to block_on"
            );
        }
        let _masked = Masked::now();
        self.co.upgrade(state, keep)
    }

    /// The [`Copyover`] back.
    pub fn into_inner(self) -> Copyover<S> {
        self.co
    }
}

impl<S> Deref for AsyncCopyover<S> {
    type Target = Copyover<S>;
    fn deref(&self) -> &Copyover<S> {
        &self.co
    }
}

impl<S> DerefMut for AsyncCopyover<S> {
    fn deref_mut(&mut self) -> &mut Copyover<S> {
        &mut self.co
    }
}

/// Takes inherited sockets as tokio sockets, registered with the current
/// runtime's reactor and non-blocking. Call them inside the runtime.
///
/// Each checks the descriptor as its [`Inherited`] counterpart does and
/// returns `Ok(None)` for a name that was not handed over (or was already
/// taken).
///
/// # Errors
///
/// [`Error::Adopt`] if the descriptor is not of the asked type, or cannot
/// be registered with tokio. Before [`Copyover::ready`] after an upgrade,
/// either rolls back at once and the call does not return (see
/// [`Inherited`'s "When a check fails"](Inherited#when-a-check-fails)).
pub trait TakeTokio {
    /// A listening TCP socket.
    fn take_tokio_tcp_listener(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::TcpListener>, Error>;
    /// A connected TCP socket.
    fn take_tokio_tcp_stream(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::TcpStream>, Error>;
    /// A UDP socket.
    fn take_tokio_udp_socket(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::UdpSocket>, Error>;
    /// A listening Unix stream socket.
    fn take_tokio_unix_listener(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::UnixListener>, Error>;
    /// A connected Unix stream socket.
    fn take_tokio_unix_stream(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::UnixStream>, Error>;
    /// A Unix datagram socket.
    fn take_tokio_unix_datagram(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::UnixDatagram>, Error>;
}

/// Makes a checked std socket non-blocking and hands it to tokio.
fn to_tokio<S, T>(
    name: &str,
    wanted: &'static str,
    taken: Result<Option<S>, Error>,
    nonblocking: impl FnOnce(&S) -> io::Result<()>,
    register: impl FnOnce(S) -> io::Result<T>,
) -> Result<Option<T>, Error>
where
    S: std::os::fd::AsRawFd,
{
    let Some(s) = taken? else { return Ok(None) };
    let fd = s.as_raw_fd();
    nonblocking(&s)
        .and_then(|()| register(s))
        .map(Some)
        .map_err(|e| {
            crate::handoff::refuse(
                name,
                fd,
                wanted,
                format!("it cannot be registered with tokio ({e})"),
            )
        })
}

impl TakeTokio for Inherited {
    fn take_tokio_tcp_listener(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::TcpListener>, Error> {
        to_tokio(
            name,
            SocketKind::TcpListener.wanted(),
            self.take_tcp_listener(name),
            |s: &net::TcpListener| s.set_nonblocking(true),
            ::tokio::net::TcpListener::from_std,
        )
    }

    fn take_tokio_tcp_stream(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::TcpStream>, Error> {
        to_tokio(
            name,
            SocketKind::TcpStream.wanted(),
            self.take_tcp_stream(name),
            |s: &net::TcpStream| s.set_nonblocking(true),
            ::tokio::net::TcpStream::from_std,
        )
    }

    fn take_tokio_udp_socket(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::UdpSocket>, Error> {
        to_tokio(
            name,
            SocketKind::Udp.wanted(),
            self.take_udp_socket(name),
            |s: &net::UdpSocket| s.set_nonblocking(true),
            ::tokio::net::UdpSocket::from_std,
        )
    }

    fn take_tokio_unix_listener(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::UnixListener>, Error> {
        to_tokio(
            name,
            SocketKind::UnixListener.wanted(),
            self.take_unix_listener(name),
            |s: &unix::UnixListener| s.set_nonblocking(true),
            ::tokio::net::UnixListener::from_std,
        )
    }

    fn take_tokio_unix_stream(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::UnixStream>, Error> {
        to_tokio(
            name,
            SocketKind::UnixStream.wanted(),
            self.take_unix_stream(name),
            |s: &unix::UnixStream| s.set_nonblocking(true),
            ::tokio::net::UnixStream::from_std,
        )
    }

    fn take_tokio_unix_datagram(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::UnixDatagram>, Error> {
        to_tokio(
            name,
            SocketKind::UnixDatagram.wanted(),
            self.take_unix_datagram(name),
            |s: &unix::UnixDatagram| s.set_nonblocking(true),
            ::tokio::net::UnixDatagram::from_std,
        )
    }
}

/// Pauses the tasks that joined it, each at a safe point of its own, and
/// collects what they hand back: a `T` per task, typically the socket and
/// the per-connection state (unread input, unsent output).
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

/// How long [`Quiesce::pause`] waits by default for the last task.
pub const PAUSE_LIMIT: Duration = Duration::from_millis(500);

#[derive(Debug)]
struct Inner<T> {
    tally: Mutex<Tally<T>>,
    /// `true` while a pause is asked for.
    paused: watch::Sender<bool>,
    /// Wakes `pause` when a task parked or left.
    changed: Notify,
    limit: Duration,
}

#[derive(Debug)]
struct Tally<T> {
    /// Tasks that joined and have not parked or left, by their number.
    live: std::collections::BTreeMap<u64, Option<String>>,
    /// Of those, the ones whose safe point was granted (they park next).
    granted: usize,
    /// Whether a pause may still grant safe points: false once it ended.
    granting: bool,
    next: u64,
    parked: Vec<T>,
}

impl<T> Inner<T> {
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
        if granted {
            tally.granted = tally.granted.saturating_sub(1);
        }
        let wake = tally.live.is_empty() || (granted && tally.granted == 0);
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
                    granted: 0,
                    granting: false,
                    next: 0,
                    parked: Vec::new(),
                }),
                paused: watch::Sender::new(false),
                changed: Notify::new(),
                limit,
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
            granted: false,
            left: false,
        }
    }

    /// Tasks that joined and have neither parked nor left.
    pub fn running(&self) -> usize {
        self.inner.tally().live.len()
    }

    /// Asks every joined task to stop at its next safe point, waits until
    /// each one parked (or ended: a closed connection), and returns what
    /// they handed back, in the order they parked. Tasks that join while
    /// the pause lasts are asked at once.
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
        self.inner.tally().granting = true;
        self.inner.paused.send_replace(true);
        let mut late = false;
        loop {
            let changed = self.inner.changed.notified();
            {
                let mut tally = self.inner.tally();
                if tally.live.is_empty() {
                    // Safe points are still granted until `resume`: a task
                    // that joins now parks for the next pause.
                    guard.1 = false;
                    tracing::debug!(tasks = tally.parked.len(), "every task parked");
                    return Ok(std::mem::take(&mut tally.parked));
                }
                if late && tally.granted == 0 {
                    // The tasks granted a safe point have parked; the
                    // others go on as they were.
                    guard.1 = false;
                    return Err(self.unpaused(&mut tally, started));
                }
            }
            if ::tokio::time::timeout_at(deadline, changed).await.is_err() {
                if late {
                    // A task granted its safe point did not park within
                    // another limit (it awaited something between
                    // `requested` and `park`): what it hands back goes to
                    // the next pause.
                    tracing::warn!("a task granted its safe point did not park in time");
                    guard.1 = false;
                    return Err(self.unpaused(&mut self.inner.tally(), started));
                }
                // No safe point is granted from now on; a task that was
                // granted one parks at once (it called `requested`).
                late = true;
                deadline += limit;
                self.end();
            }
        }
    }

    /// What a pause that ended without every task comes to.
    fn unpaused(&self, tally: &mut Tally<T>, started: std::time::Instant) -> Unpaused<T> {
        let running = tally
            .live
            .iter()
            .map(|(id, name)| name.clone().unwrap_or_else(|| format!("task {id}")))
            .collect();
        Unpaused {
            parked: std::mem::take(&mut tally.parked),
            running,
            waited: started.elapsed(),
        }
    }

    /// No safe point is granted any more, and no task is asked to stop.
    fn end(&self) {
        self.inner.tally().granting = false;
        self.inner.paused.send_replace(false);
    }

    /// Ends the pause: tasks that join from now on run until the next one.
    /// Call it after a failed commit, before spawning the tasks again from
    /// what [`pause`](Self::pause) returned. (A pause that ended with
    /// [`Unpaused`] has ended already.)
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
    paused: watch::Receiver<bool>,
    id: u64,
    /// The pause granted this task its safe point: it parks next.
    granted: bool,
    left: bool,
}

impl<T> SafePoint<T> {
    /// Completes when a pause is asked for (at once if one is under way),
    /// and grants this task its safe point: [`park`](Self::park) right
    /// after, with no `.await` in between. Cancel-safe: put it in the
    /// task's `select!` loop, beside the reads and writes.
    pub async fn requested(&mut self) {
        loop {
            if self.paused.wait_for(|p| *p).await.is_err() {
                // Every `Quiesce` was dropped: no pause will ever come.
                std::future::pending::<()>().await;
            }
            if self.grant() {
                return;
            }
            // This pause ended before granting us: wait for the next one.
            if self.paused.wait_for(|p| !*p).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Takes this task's safe point in the pause under way, if that pause
    /// still grants them (it did not end).
    fn grant(&mut self) -> bool {
        let mut tally = self.inner.tally();
        if !self.granted && tally.granting {
            tally.granted += 1;
            self.granted = true;
        }
        self.granted
    }

    /// Whether a pause is asked for now.
    pub fn is_requested(&self) -> bool {
        *self.paused.borrow()
    }

    /// Hands the task's socket and state back to the pausing task. The task
    /// should end right after: the main task owns them now.
    pub fn park(mut self, item: T) {
        let mut tally = self.inner.tally();
        tally.parked.push(item);
        self.left = true;
        self.inner.leave(tally, self.id, self.granted);
    }
}

impl<T> Drop for SafePoint<T> {
    fn drop(&mut self) {
        if !self.left {
            self.inner.leave(self.inner.tally(), self.id, self.granted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_collects_every_task_and_resume_lets_new_ones_run() {
        let rt = runtime().unwrap();
        rt.block_on(async {
            let q: Quiesce<u32> = Quiesce::new();
            let mut handles = Vec::new();
            for i in 0..50u32 {
                let mut sp = q.join();
                handles.push(::tokio::spawn(async move {
                    if i % 10 == 0 {
                        // A connection that ends before the pause.
                        return;
                    }
                    sp.requested().await;
                    sp.park(i);
                }));
            }
            let mut got = q.pause().await.unwrap();
            got.sort_unstable();
            assert_eq!(got, (0..50).filter(|i| i % 10 != 0).collect::<Vec<_>>());
            assert_eq!(q.running(), 0);
            // One that joins during a pause is asked at once.
            let mut late = q.join();
            assert!(late.is_requested());
            late.requested().await;
            late.park(99);
            assert_eq!(q.pause().await.unwrap(), [99]);
            q.resume();
            let sp = q.join();
            assert!(!sp.is_requested());
            drop(sp);
            for h in handles {
                h.await.unwrap();
            }
        });
    }

    #[test]
    fn a_task_that_never_reaches_its_safe_point_ends_the_pause_not_the_server() {
        let rt = runtime().unwrap();
        rt.block_on(async {
            // The stuck task never parks before it is let go: the limit
            // only bounds how long this test waits.
            let q: Quiesce<u32> = Quiesce::with_limit(Duration::from_secs(2));
            // A task stuck outside its safe point (a write to a client that
            // does not read), until it is let go.
            let (go, stuck_until) = ::tokio::sync::oneshot::channel::<()>();
            let mut stuck = q.join_as("10.0.0.9:4000");
            let stuck_task = ::tokio::spawn(async move {
                let _ = stuck_until.await;
                stuck.requested().await;
                stuck.park(9);
            });
            let mut quick = Vec::new();
            for i in 0..5u32 {
                let mut sp = q.join();
                quick.push(::tokio::spawn(async move {
                    sp.requested().await;
                    sp.park(i);
                }));
            }
            let unpaused = q.pause().await.unwrap_err();
            let mut parked = unpaused.parked.clone();
            parked.sort_unstable();
            assert_eq!(parked, [0, 1, 2, 3, 4]);
            assert_eq!(unpaused.running, ["10.0.0.9:4000"]);
            assert!(unpaused.to_string().contains("10.0.0.9:4000"), "{unpaused}");
            // The stuck task is not asked to stop any more: once let go, it
            // runs on, and parks only at the next pause.
            assert!(!q.join().is_requested());
            go.send(()).unwrap();
            ::tokio::task::yield_now().await;
            assert_eq!(q.running(), 1);
            assert_eq!(q.pause().await.unwrap(), [9]);
            stuck_task.await.unwrap();
            for h in quick {
                h.await.unwrap();
            }
        });
    }

    #[test]
    fn runtime_threads_block_the_held_signals() {
        let rt = runtime().unwrap();
        let masks = rt.block_on(async {
            let mut v = Vec::new();
            for _ in 0..8 {
                v.push(
                    ::tokio::task::spawn_blocking(|| {
                        crate::signal::HELD_SIGNALS
                            .iter()
                            .all(|s| crate::sys::is_blocked(*s))
                    })
                    .await
                    .unwrap(),
                );
            }
            v
        });
        assert!(masks.iter().all(|m| *m));
        assert!(
            !crate::sys::is_blocked(libc::SIGHUP),
            "building the runtime left this thread's mask as it was"
        );
    }
}
