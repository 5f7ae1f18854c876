//! copyover upgrades a Linux server's binary in place: same PID, every
//! connection kept, nothing lost.
//!
//! # The upgrade, as a story
//!
//! 1. An operator deploys a new binary over the old path and sends
//!    **SIGHUP** (or `systemctl reload`). The handler only sets a flag and
//!    wakes the event loop through [`Copyover::event_fd`].
//! 2. At a **safe point**, the loop sees [`Event::Upgrade`] and calls
//!    [`Copyover::upgrade`] with its state (any serde type implementing
//!    [`AppState`]; the handle is a `Copyover<State>`, bound to that type by
//!    `boot::<State>`, so the state handed over is the one the next image
//!    restores) and a [`Handoff`] naming the descriptors to keep:
//!    listeners and established connections.
//! 3. The runtime **probes** the new binary: it starts it in probe mode
//!    against a sealed snapshot, on a helper thread, while the loop keeps
//!    serving. A binary that is not a copyover program of this application,
//!    or cannot read this state version, is refused here.
//! 4. On a yes, [`Event::UpgradeApproved`] comes and `upgrade` **commits**:
//!    the state goes into a sealed memfd, every fd becomes close-on-exec but
//!    the kept ones, the reload signals are held, and the binary's path is
//!    executed **at the same PID**.
//! 5. The new image calls [`boot`] first thing, gets [`Start::Resumed`] with
//!    the state and the [`Inherited`] descriptors, claims them by name,
//!    registers them, and calls [`Copyover::ready`]; the runtime reports
//!    `upgrade complete` with the blackout (log, status file, sd_notify)
//!    from its helper thread while the new image already serves.
//! 6. Until `ready`, any failure of the new image (an error, a panic, a
//!    crash, a missed deadline, an exit) **rolls back**: the old binary is
//!    executed again from a descriptor opened at its start-up, with the
//!    untouched snapshot (a [`Region`] is shared, not copied: it holds what
//!    the failed image wrote). If the new image dies before `boot` could
//!    arm that (in the dynamic loader, say), or never becomes ready at all
//!    (it hangs before `main`, is stopped, blocks SIGALRM), a holder the
//!    commit left behind, a child with the old image's descriptors, ends
//!    it at its own deadline and starts the old binary instead, under the
//!    holder's PID. Clients see a stall, never a disconnect.
//!
//! # Or a new process
//!
//! SIGUSR2 (or [`Copyover::request_migration`], or `copyover migrate PID`)
//! asks for a **migration** instead: the same events, the same two
//! `upgrade` calls, the same probe and snapshot, but the state and the
//! descriptors go to a new process of the binary, started beside this one
//! (the binary's path may be a wrapper that changes its user or its
//! namespaces), and this process exits once the new one is ready. A new
//! process that fails is killed, and this one serves on: it never closed
//! anything. See [`migration`].
//!
//! # A complete server `main`
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use std::net::{TcpListener, TcpStream};
//! use copyover::{AppState, Config, Event, Handoff, Start};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Default)]
//! struct State { connections: Vec<u64>, counter: u64 }
//!
//! impl AppState for State {
//!     const VERSION: u32 = 1;
//! }
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // 1. First thing: hand the start to copyover.
//!     let (mut co, start) = copyover::boot::<State>(Config::new("counter", "v1"))?;
//!     // 2. Fresh start or resumed image.
//!     let (mut state, listener, mut conns) = match start {
//!         Start::Fresh => (State::default(), TcpListener::bind("127.0.0.1:7000")?, Vec::new()),
//!         Start::Resumed { state, mut fds } => {
//!             let listener = fds.take_tcp_listener("listener")?.ok_or("no listener")?;
//!             // Every connection, with the id it was kept under, in one call.
//!             let conns = fds.take_tcp_streams("conn")?;
//!             (state, listener, conns)
//!         }
//!     };
//!     listener.set_nonblocking(true)?;
//!     // 3. Registered and serving: the new image is ready.
//!     co.ready()?;
//!     loop {
//!         // A real server waits on epoll/poll for `co.event_fd()` and its
//!         // sockets; this sketch polls.
//!         if let Ok((s, _)) = listener.accept() {
//!             state.counter += 1;
//!             conns.push((state.counter, s));
//!         }
//!         while let Some(event) = co.poll() {
//!             match event {
//!                 Event::Upgrade | Event::UpgradeApproved => {
//!                     state.connections = conns.iter().map(|(id, _)| *id).collect();
//!                     let mut keep = Handoff::new();
//!                     keep.listener("listener", &listener)
//!                         .streams("conn", conns.iter().map(|(id, s)| (*id, s)));
//!                     // Probing: returns and we keep serving. Committing: does
//!                     // not return on success. An error: logged, keep serving.
//!                     let _ = co.upgrade(&state, &keep);
//!                 }
//!                 Event::Shutdown => return Ok(()),
//!                 _ => {}
//!             }
//!         }
//!         std::thread::sleep(std::time::Duration::from_millis(10));
//!     }
//! }
//! ```
//!
//! # What crosses the exec, and what does not
//!
//! * Kept: the PID, the descriptors in the [`Handoff`] (their `O_NONBLOCK`
//!   and socket options too: they live on the open file description), the
//!   state you serialize, the environment, the working directory, rlimits,
//!   seccomp filters and `no_new_privs`, the signal mask (the runtime
//!   manages it), children (they are the new image's children now).
//!   `ITIMER_REAL` survives too, but the runtime takes it from the exec to
//!   `ready` (the readiness deadline replaces whatever the old image had
//!   armed, and `ready` cancels it): an application's own `alarm` does not
//!   survive an upgrade.
//! * Not kept: threads (all but the calling one are destroyed: put
//!   everything worth keeping in the state), memory not in the state (but
//!   see [`Region`] for bulk bytes that cross in place), signal handlers
//!   (the runtime installs its own in `boot`), descriptors not in the
//!   handoff (closed; a listening socket missing from it is warned about).
//! * Threads of the runtime: [`boot`] starts one helper thread (the probe
//!   runs on it, the holder is reaped there, the outcome of an upgrade is
//!   written from it, and it claims the inherited descriptors and prepares
//!   the kept ones while the state is decoded and encoded); it blocks the
//!   reload signals, so they always reach the application's own threads.
//! * Epoll registrations vanish with a closed epoll fd: register the
//!   adopted descriptors again, or keep the epoll fd itself in the handoff
//!   ([`Handoff::other`]), and every registration (with its token) survives;
//!   add only [`Copyover::event_fd`], which is new in every image. With
//!   10,000 connections that is the difference between re-registering them
//!   all during the blackout and not.
//! * What the blackout costs, and how to keep it near the floor (an
//!   `execve`): per kept connection one syscall in each image (both on the
//!   runtime's helper thread, beside the state's encoding and decoding), and
//!   the state's encoding and decoding themselves. Keep connections as a
//!   group ([`Handoff::streams`]: one manifest entry, not a name each), keep
//!   the epoll fd (above), decode large maps in bulk
//!   ([`state::bulk_map`]), prefer small collections to a map per record,
//!   and put bulk bytes in a [`Region`]. The telnet demo does all of it: at
//!   9,000 idle clients its stall is under 1.5x that of a bench server with
//!   almost no state (`scripts/bench-demo`).
//! * Userspace protocol state such as **TLS sessions** (rustls, OpenSSL) or
//!   compression contexts lives in memory: it survives only if you
//!   serialize it (rustls can export its traffic secrets with
//!   `dangerous_extract_secrets`, kTLS moves them into the kernel, where
//!   they survive with the socket). Otherwise, finish or refuse such
//!   sessions before you accept the upgrade. The telnet demo finishes its
//!   option negotiation cleanly.
//!
//! # Operations
//!
//! With `NOTIFY_SOCKET` set, the runtime speaks systemd's notify protocol
//! (`Type=notify`, or `Type=notify-reload` on systemd 253+): `READY=1`,
//! `RELOADING=1`, `STATUS=`. It offers socket-activated listeners on a first
//! start ([`Copyover::take_activated_tcp_listener`]), and keeps a status file
//! per process ([`status`]) that the `copyover` CLI reads. With systemd's
//! file descriptor store ([`fdstore`]) a crash drops no client either: the
//! restarted service resumes from the last [`Copyover::checkpoint`] with
//! every connection.
//!
//! # tokio servers
//!
//! With the `tokio` feature, the module `copyover::tokio` awaits the events,
//! takes inherited sockets as tokio sockets, pauses every connection task
//! at a safe point for the commit (and lets them go on if it fails), and
//! builds a multi-threaded runtime whose threads leave the reload signals
//! to the main thread. `boot` still comes first, before the runtime. For
//! the common shape (a listener, a task per connection) its `Server` does
//! the whole upgrade: each connection says what it carries (`Session`: a
//! socket or a `Framed` with its buffers, and a record of its own).
//!
//! # Where things are
//!
//! For a reader of the source, one idea per module:
//!
//! * `upgrade`: the old image's side of one upgrade: where it stands
//!   (`upgrade::phase`), the probe, the commit and its exec, and what
//!   crosses the exec besides the snapshot (the exec record, the
//!   environment variables);
//! * `resume` ([`boot`]): the new image's side: the variables read, the
//!   descriptors claimed, the rollback armed, the state restored;
//! * `rollback` and `sys::rollback`: the old binary run again after any
//!   failure before `ready`; `sys::holder`: the child that keeps the
//!   deadline from outside and rescues a new image that died;
//! * [`handoff`]: what crosses by name ([`Handoff`] kept, [`Inherited`]
//!   taken and checked); [`snapshot`]: the bytes (format, manifest, memfd);
//! * `runtime`: the handle a server holds ([`Copyover`]: events, upgrade,
//!   ready); [`status`]: how each outcome is reported;
//! * `tokio` (feature `tokio`): the same for tokio servers; `tls` (feature
//!   `tls`): TLS 1.3 sessions that cross with their keys and numbers;
//! * `sys`: every system call and every `unsafe` block, one kernel object
//!   a file.
//!
//! # Specifications
//!
//! The snapshot layout ([`snapshot`]), the handoff variable ([`handoff`])
//! and the probe protocol ([`probe`]) are versioned and written down, since
//! two different builds must agree on them.
#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod env;
mod error;
pub mod fdstore;
pub mod handoff;
pub mod migration;
mod notify;
pub mod region;
mod resume;
mod rollback;
mod runtime;
pub mod signal;
pub mod snapshot;
pub mod state;
pub mod status;
#[allow(unsafe_code)]
mod sys;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "tokio")]
pub mod tokio;
pub mod upgrade;
pub use upgrade::probe;
mod worker;

pub use error::{Error, UpgradeError};
pub use handoff::{Handoff, Inherited, StreamSocket};
pub use region::Region;
pub use resume::boot;
pub use runtime::{Config, Copyover, Event, Start};
pub use snapshot::SnapshotError;
pub use state::AppState;
pub use upgrade::Progress;
