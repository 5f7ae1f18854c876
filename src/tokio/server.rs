//! A tokio server's whole upgrade in one handle ([`Server`]).

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

use ::tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::runtime::{Config, Start};

/// The handoff group the sessions' sockets are kept under.
const GROUP: &str = "copyover-session";

/// Boots copyover (before any thread), builds the runtime ([`runtime`]) and
/// runs `server` on it with a [`Server`] of sessions `T`: what
/// `#[tokio::main]` does for a server that is not upgradeable.
///
/// ```no_run
/// # use copyover::tokio::{Server, Session, Buffers, Transport};
/// # struct Client(tokio::net::TcpStream);
/// # impl Session for Client {
/// #     type Transport = tokio::net::TcpStream;
/// #     type Record = ();
/// #     fn transport(&self) -> &tokio::net::TcpStream { &self.0 }
/// #     fn save(&mut self) {}
/// #     fn restore(_: (), t: tokio::net::TcpStream) -> Self { Client(t) }
/// # }
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     copyover::tokio::serve(copyover::Config::new("app", "v1"), run)
/// }
///
/// async fn run(mut server: Server<Client>) -> Result<(), Box<dyn std::error::Error>> {
///     let listener = server.tcp_listener("listener", "127.0.0.1:7000").await?;
///     for client in server.ready()? { /* spawn its task */ }
///     // ... the accept loop, with `server.accept(&listener)`
///     # Ok(())
/// }
/// ```
///
/// # Errors
///
/// Those of [`boot`](crate::boot), or [`Error::Setup`] if the runtime
/// cannot be built; then whatever `server` returns.
pub fn serve<T, F, Fut, E>(config: Config, server: F) -> Result<(), E>
where
    T: Session,
    F: FnOnce(Server<T>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: From<Error>,
{
    let (co, start) = crate::boot::<Sessions<T>>(config)?;
    let runtime = runtime().map_err(|source| Error::Setup {
        what: "build the tokio runtime",
        source,
    })?;
    runtime.block_on(async move { server(Server::new(co, start)?).await })
}

/// The listeners, and the parked sessions' sockets by their order.
fn keep<'a, T: Session>(listeners: &'a [(String, OwnedFd)], parked: &'a [T]) -> Handoff<'a> {
    let mut keep = Handoff::new();
    for (name, fd) in listeners {
        keep.listener(name.clone(), fd);
    }
    let sockets = parked.iter().map(|s| s.transport().socket());
    keep.streams(GROUP, (0u64..).zip(sockets));
    keep
}

/// What [`Server::handle`] asks of the application.
#[derive(Debug)]
#[must_use]
pub enum Handled<T> {
    /// Nothing to do: serve on.
    Serving,
    /// The commit did not happen (it failed, or a task did not reach its
    /// safe point in time; the runtime reported why): spawn a task again
    /// for each of these, as for the sessions [`Server::ready`] returned.
    Respawn(Vec<T>),
    /// SIGTERM or SIGINT: shut down.
    Shutdown,
}

/// What [`Server::accept`] returns.
#[derive(Debug)]
#[must_use]
pub enum Accepted<T> {
    /// A new connection.
    Connection(TcpStream, SocketAddr),
    /// As [`Handled::Respawn`]: spawn a task again for each.
    Respawn(Vec<T>),
    /// SIGTERM or SIGINT: shut down.
    Shutdown,
}

/// The sessions' records, and the descriptors, until `ready`.
type Resumed<T> = (VecDeque<(Buffers, <T as Session>::Record)>, Inherited);

/// A tokio server's whole upgrade in one handle, for the common shape: a
/// listener, a task per connection, a [`Session`] each.
///
/// * [`serve`] boots, builds the runtime and hands the server's code a
///   [`Server`];
/// * [`Server::tcp_listener`]: the listener, inherited or bound;
/// * [`Server::ready`]: every session of the previous image, restored, all
///   of them before any task runs (a first broadcast reaches everyone);
/// * each task joins with [`Server::safe_point`] and parks there;
/// * [`Server::accept`] (or [`next_event`](Server::next_event) and
///   [`handle`](Server::handle) in a `select!` of your own): the probe on a
///   SIGHUP, then the pause, the records, the handoff and the commit; what
///   comes back to spawn again if the commit did not happen (a failed
///   exec, a task that did not reach its safe point in time).
pub struct Server<T: Session> {
    co: AsyncCopyover<Sessions<T>>,
    quiesce: Quiesce<T>,
    /// What the previous image handed over, until `ready`.
    resumed: Option<Resumed<T>>,
    /// The listeners to keep, by name (a duplicate of each: the handoff
    /// keeps the same socket).
    listeners: Vec<(String, OwnedFd)>,
}

impl<T: Session> std::fmt::Debug for Server<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("co", &self.co)
            .field("listeners", &self.listeners)
            .finish_non_exhaustive()
    }
}

impl<T: Session> Server<T> {
    /// The server, from what [`boot`](crate::boot) returned (which
    /// [`serve`] does for you). Call it inside the runtime.
    ///
    /// # Errors
    ///
    /// [`Error::Setup`] if the runtime's event descriptor cannot be
    /// registered with tokio (no runtime).
    pub fn new(co: Copyover<Sessions<T>>, start: Start<Sessions<T>>) -> Result<Self, Error> {
        let co = AsyncCopyover::new(co).map_err(|source| Error::Setup {
            what: "register the runtime's events with tokio",
            source,
        })?;
        let resumed = match start {
            Start::Fresh => None,
            Start::Resumed { state, fds } => Some((state.entries.into(), fds)),
        };
        Ok(Server {
            co,
            quiesce: Quiesce::new(),
            resumed,
            listeners: Vec::new(),
        })
    }

    /// The pause's limit (default [`PAUSE_LIMIT`]). Call it before any task
    /// joins.
    pub fn set_pause_limit(&mut self, limit: Duration) {
        self.quiesce = Quiesce::with_limit(limit);
    }

    /// The listener kept under `name`: inherited from the previous image,
    /// or bound to `addr` on a first start. It is kept at every upgrade.
    ///
    /// # Errors
    ///
    /// [`Error::Adopt`] if the inherited descriptor is not a TCP listener
    /// (before `ready` after an upgrade: a rollback, which does not return),
    /// [`Error::Setup`] if binding fails.
    pub async fn tcp_listener(
        &mut self,
        name: &str,
        addr: impl ::tokio::net::ToSocketAddrs,
    ) -> Result<TcpListener, Error> {
        let inherited = match &mut self.resumed {
            Some((_, fds)) => fds.take_tokio_tcp_listener(name)?,
            None => None,
        };
        let listener = match inherited {
            Some(listener) => listener,
            None => TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Setup {
                    what: "bind the listener",
                    source,
                })?,
        };
        let kept = listener
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| Error::Setup {
                what: "duplicate the listener for the handoff",
                source,
            })?;
        self.listeners.push((name.to_owned(), kept));
        Ok(listener)
    }

    /// Says the server is ready ([`Copyover::ready`]) and returns every
    /// session of the previous image, restored (none on a first start).
    /// Take the listeners first. Spawn a task for each session only now,
    /// after putting every one where the others find it (a map of peers).
    ///
    /// # Errors
    ///
    /// [`Error::Adopt`] if a session's descriptor is not a TCP stream
    /// (before `ready`: a rollback, which does not return), or an error of
    /// [`Copyover::ready`].
    pub fn ready(&mut self) -> Result<Vec<T>, Error> {
        let (mut records, sockets) = match self.resumed.take() {
            Some((records, mut fds)) => {
                let sockets = fds.take_tcp_streams(GROUP)?;
                (records, sockets)
            }
            None => (VecDeque::new(), Vec::new()),
        };
        self.co.ready()?;
        let mut sockets: std::collections::HashMap<u64, std::net::TcpStream> =
            sockets.into_iter().collect();
        let mut sessions = Vec::with_capacity(sockets.len());
        let mut id = 0u64;
        while let Some((buffers, record)) = records.pop_front() {
            let socket = sockets.remove(&id).ok_or_else(|| {
                std::io::Error::other(format!("session {id}'s socket was not handed over"))
            });
            id += 1;
            let socket = socket.and_then(|s| {
                s.set_nonblocking(true)?;
                TcpStream::from_std(s)
            });
            match socket {
                Ok(socket) => {
                    sessions.push(T::restore(record, T::Transport::rebuild(socket, buffers)));
                }
                Err(e) => tracing::warn!("lost a session: {e}"),
            }
        }
        Ok(sessions)
    }

    /// A safe point for one connection's task, named for the refusal if it
    /// does not reach it in time (its peer's address, say).
    pub fn safe_point(&self, name: impl Into<String>) -> SafePoint<T> {
        self.quiesce.join_as(name)
    }

    /// The next connection on `listener`, handling the runtime's events
    /// meanwhile (see [`handle`](Self::handle)). Not cancel-safe while it
    /// handles an upgrade: await it to its end, do not race it in a
    /// `select!` (use [`next_event`](Self::next_event) there).
    ///
    /// # Errors
    ///
    /// The listener's `accept` error.
    pub async fn accept(&mut self, listener: &TcpListener) -> std::io::Result<Accepted<T>> {
        loop {
            let event = ::tokio::select! {
                accepted = listener.accept() => {
                    let (stream, addr) = accepted?;
                    return Ok(Accepted::Connection(stream, addr));
                }
                event = self.co.next_event() => event,
            };
            match self.handle(event).await {
                Handled::Serving => {}
                Handled::Respawn(sessions) => return Ok(Accepted::Respawn(sessions)),
                Handled::Shutdown => return Ok(Accepted::Shutdown),
            }
        }
    }

    /// The runtime's next event; cancel-safe, for the main task's
    /// `select!`. Hand it to [`handle`](Self::handle).
    pub async fn next_event(&mut self) -> Event {
        self.co.next_event().await
    }

    /// Handles an event: on [`Event::Upgrade`] starts the probe; on
    /// [`Event::UpgradeApproved`] pauses every task, saves each session and
    /// commits (which, on success, never returns). Call it in the body of
    /// a `select!` arm, not in a future `select!` may drop: it awaits the
    /// pause.
    pub async fn handle(&mut self, event: Event) -> Handled<T> {
        match event {
            Event::Upgrade => {
                // The probe checks that the new build reads this state.
                let _ = self
                    .co
                    .upgrade(&Sessions::default(), &keep::<T>(&self.listeners, &[]));
                Handled::Serving
            }
            Event::UpgradeApproved => match self.quiesce.pause().await {
                Ok(mut parked) => {
                    let entries = parked
                        .iter_mut()
                        .map(|s| {
                            let record = s.save();
                            (s.transport().buffers(), record)
                        })
                        .collect();
                    // Returns only if the commit failed: serve on.
                    let kept = keep(&self.listeners, &parked);
                    let _ = self.co.upgrade(&Sessions::new(entries), &kept);
                    self.quiesce.resume();
                    Handled::Respawn(parked)
                }
                Err(unpaused) => {
                    self.co.abandon(&unpaused.to_string());
                    Handled::Respawn(unpaused.parked)
                }
            },
            Event::Shutdown => Handled::Shutdown,
            _ => Handled::Serving,
        }
    }

    /// The [`AsyncCopyover`], for everything else ([`generation`](Copyover::generation), ...).
    pub fn copyover(&mut self) -> &mut AsyncCopyover<Sessions<T>> {
        &mut self.co
    }
}
