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
//!                     let safe_point = quiesce.join();
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

mod events;
mod quiesce;
mod server;
mod session;
mod take;
#[cfg(test)]
mod tests;
mod threads;

pub use events::AsyncCopyover;
pub use quiesce::{BUSY, PAUSE_LIMIT, Quiesce, SafePoint, Unpaused};
pub use server::{Handled, Server, hold, pause_requested, serve};
pub use session::{Buffers, Session, Sessions, Transport};
pub use take::TakeTokio;
use threads::Masked;
pub use threads::{build_runtime, mask_held_signals, runtime, runtime_builder};
