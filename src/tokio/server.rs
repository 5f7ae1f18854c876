//! A tokio server's whole upgrade in one handle ([`Server`]).

use std::any::Any;
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

use ::tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::runtime::{Config, Start};

/// The handoff group the sessions' sockets are kept under.
const GROUP: &str = "copyover-session";
/// The sealed memfd of the sessions' TLS sessions, by the same ids.
#[cfg(feature = "tls")]
const TLS_SESSIONS: &str = "copyover-tls-sessions";

/// What a session's task hands over while it holds in place: a copy of its
/// state, and a duplicate of its socket for the handoff.
pub(super) struct Held {
    record: Box<dyn Any + Send>,
    buffers: Buffers,
    socket: std::net::TcpStream,
    /// The transport's TLS session (keys, numbers, buffered records).
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::Saved>,
}

::tokio::task_local! {
    /// The safe point of a task that [`Server::spawn`] started.
    static POINT: Arc<SafePoint<Held>>;
}

/// Completes when an upgrade asks this task to pause (at once if a pause is
/// under way); then call [`hold`] with the task's session. Cancel-safe: put
/// it in the task's `select!`, beside the reads and the pending writes. In
/// a task that [`Server::spawn`] did not start, it never completes.
pub async fn pause_requested() {
    match POINT.try_with(Arc::clone) {
        Ok(point) => point.requested().await,
        Err(_) => std::future::pending().await,
    }
}

/// Holds this task in place for the upgrade: once every session's task has
/// stopped, hands a copy of `session` over (its [`Session::save`] record,
/// its transport's buffered bytes, a duplicate of its socket) and waits
/// until the pause ends. If the commit happens, it never returns (the new
/// image has the session); if not (the exec failed, another task did not
/// pause in time), it returns and the task goes on from where it was, with
/// everything it had. Call it right after [`pause_requested`] completed,
/// and await it to its end.
///
/// A socket that cannot be duplicated (the process is out of descriptors)
/// cannot be handed over, nor can a TLS session in the middle of its
/// handshake (between the server's answer and the client's `Finished`):
/// the upgrade is abandoned (logged, naming the task), and every task
/// serves on.
pub async fn hold<T: Session>(session: &mut T) {
    let Ok(point) = POINT.try_with(Arc::clone) else {
        return;
    };
    // Duplicated now, while other tasks still stop: the socket is the same
    // at the copy, which waits until every task has stopped.
    let socket = session.transport().socket().as_fd().try_clone_to_owned();
    point
        .hold(|| {
            let record = session.save();
            let transport = session.transport();
            #[cfg(feature = "tls")]
            let tls = match transport.tls().map(|c| c.save()) {
                None => None,
                Some(Ok(saved)) => Some(saved),
                Some(Err(e)) => {
                    tracing::warn!("a session cannot be handed over for the upgrade: {e}");
                    return None;
                }
            };
            match socket {
                Ok(fd) => Some(Held {
                    record: Box::new(record),
                    buffers: transport.buffers(),
                    socket: std::net::TcpStream::from(fd),
                    #[cfg(feature = "tls")]
                    tls,
                }),
                Err(e) => {
                    tracing::warn!("a session cannot be handed over for the upgrade: {e}");
                    None
                }
            }
        })
        .await;
}

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
///     for client in server.ready().await? { /* server.spawn(its task) */ }
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

/// Abandons the upgrade if dropped while it still holds the handle.
struct AbandonOnDrop<'a, T: Session>(Option<&'a mut AsyncCopyover<Sessions<T>>>);

impl<T: Session> Drop for AbandonOnDrop<'_, T> {
    fn drop(&mut self) {
        if let Some(co) = self.0.take() {
            co.abandon("the server stopped awaiting the pause (its future was dropped)");
        }
    }
}

/// The commit, with what every task handed over; returns only if it did
/// not happen.
fn commit<T: Session>(
    co: &mut AsyncCopyover<Sessions<T>>,
    listeners: &[(String, OwnedFd)],
    held: Vec<Held>,
) {
    let mut entries = Vec::with_capacity(held.len());
    let mut sockets = Vec::with_capacity(held.len());
    #[cfg(feature = "tls")]
    let mut carry = crate::tls::Carry::new();
    for h in held {
        match h.record.downcast::<T::Record>() {
            Ok(record) => entries.push((h.buffers, *record)),
            Err(_) => {
                let reason = "a task held a record of another type than the server's sessions";
                return co.abandon(reason);
            }
        }
        #[cfg(feature = "tls")]
        if let Some(saved) = h.tls {
            // The sockets' ids in the handoff are their order.
            carry.push(sockets.len() as u64, saved);
        }
        sockets.push(h.socket);
    }
    #[allow(unused_mut)]
    let mut kept = keep(listeners, &sockets);
    #[cfg(feature = "tls")]
    let sessions = if carry.is_empty() {
        None
    } else {
        match carry.seal() {
            Ok(sessions) => Some(sessions),
            Err(e) => return co.abandon(&e.to_string()),
        }
    };
    #[cfg(feature = "tls")]
    if let Some(sessions) = &sessions {
        kept.other(TLS_SESSIONS, sessions);
    }
    let _ = co.upgrade(&Sessions::new(entries), &kept);
}

/// Into how many tasks `ready` splits the sessions' registration.
const WORKER_SHARES: usize = 4;

/// One session built again around its socket, registered with tokio.
fn restore<T: Session>((buffers, record, socket, tls): Pair<T>) -> Result<T, Error> {
    let socket = socket
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(socket))
        .map_err(|source| Error::Setup {
            what: "register a session's socket with tokio",
            source,
        })?;
    #[cfg(feature = "tls")]
    if let Some(tls) = tls {
        let transport =
            T::Transport::rebuild_tls(socket, buffers, tls).ok_or_else(|| Error::Setup {
                what: "restore a TLS session",
                source: std::io::Error::other(
                    "the session's transport has no TLS: Session::Transport changed between builds",
                ),
            })?;
        return Ok(T::restore(record, transport));
    }
    #[cfg(not(feature = "tls"))]
    let () = tls;
    Ok(T::restore(record, T::Transport::rebuild(socket, buffers)))
}

/// Puts first the sessions with input read and not yet handled (a stable
/// order otherwise: the previous image handed the busy sessions over
/// first); returns how many. Unsent output does not count: an idle
/// session's inbox, drained into its output when it was saved, would put
/// every idle listener of a busy chat before the busy sessions.
///
/// No `poll` over the sockets for input that came during the blackout: over
/// a thousand idle sessions it costs a millisecond inside the blackout, more
/// than it saves the few sessions it would find.
fn active_first<T: Session>(pairs: &mut Vec<Pair<T>>) -> usize {
    let (mut first, rest): (Vec<_>, Vec<_>) = std::mem::take(pairs)
        .into_iter()
        .partition(|(buffers, ..)| !buffers.unread.is_empty());
    let waiting = first.len();
    first.extend(rest);
    *pairs = first;
    waiting
}

/// A session's buffers, record and socket, and its TLS connection.
#[cfg(feature = "tls")]
type Pair<T> = (
    Buffers,
    <T as Session>::Record,
    std::net::TcpStream,
    Option<crate::tls::Connection>,
);
#[cfg(not(feature = "tls"))]
type Pair<T> = (Buffers, <T as Session>::Record, std::net::TcpStream, ());

/// A TLS session that cannot be restored: before `ready`, a rollback.
#[cfg(feature = "tls")]
fn tls_setup(e: impl std::fmt::Display) -> Error {
    Error::Setup {
        what: "restore the TLS sessions",
        source: std::io::Error::other(e.to_string()),
    }
}

/// The listeners, and the sessions' sockets by their order.
fn keep<'a>(listeners: &'a [(String, OwnedFd)], sockets: &'a [std::net::TcpStream]) -> Handoff<'a> {
    let mut keep = Handoff::new();
    for (name, fd) in listeners {
        keep.listener(name.clone(), fd);
    }
    keep.streams(GROUP, (0u64..).zip(sockets));
    keep
}

/// What [`Server::handle`] asks of the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
#[non_exhaustive]
pub enum Handled {
    /// Serve on: nothing happened, or an upgrade did not (the runtime
    /// reported why) and every task went on from where it held.
    Serving,
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
/// * [`Server::spawn`] starts each session's task, which has a safe point:
///   [`pause_requested`] in its `select!`, then [`hold`], where it waits in
///   place;
/// * [`Server::accept`] (or [`next_event`](Server::next_event) and
///   [`handle`](Server::handle) in a `select!` of your own): the probe on a
///   SIGHUP, then the pause, the records, the handoff and the commit. If
///   the commit does not happen (a failed exec, a task that did not reach
///   its safe point in time) every task simply goes on: nothing to spawn
///   again.
pub struct Server<T: Session> {
    co: AsyncCopyover<Sessions<T>>,
    quiesce: Quiesce<Held>,
    /// What the previous image handed over, until `ready`.
    resumed: Option<Resumed<T>>,
    /// The TLS configuration the sessions' TLS streams are restored with.
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::Config>,
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
            #[cfg(feature = "tls")]
            tls: None,
            listeners: Vec::new(),
        })
    }

    /// The TLS configuration of the sessions whose transport is a
    /// [`TlsStream`](crate::tls::TlsStream) (or a `Framed` of one): set it
    /// before [`ready`](Self::ready), which restores their TLS sessions with
    /// it (the `tls` feature).
    #[cfg(feature = "tls")]
    pub fn tls(&mut self, config: crate::tls::Config) -> &mut Self {
        self.tls = Some(config);
        self
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
    /// (before `ready`: a rollback, which does not return); [`Error::Setup`]
    /// if a session's socket cannot be registered with tokio or its
    /// [`Session::restore`] panicked (this is before `ready`: return it from
    /// `main`, and the rollback brings the old image back with every
    /// client); or an error of [`Copyover::ready`].
    pub async fn ready(&mut self) -> Result<Vec<T>, Error> {
        #[cfg(feature = "tls")]
        let mut carried = crate::tls::Carried::default();
        let (mut records, sockets) = match self.resumed.take() {
            Some((records, mut fds)) => {
                #[cfg(feature = "tls")]
                {
                    carried =
                        crate::tls::Carried::take(&mut fds, TLS_SESSIONS).map_err(tls_setup)?;
                }
                let sockets = fds.take_tcp_streams(GROUP)?;
                (records, sockets)
            }
            None => (VecDeque::new(), Vec::new()),
        };
        let started = std::time::Instant::now();
        let mut sockets: std::collections::HashMap<u64, std::net::TcpStream> =
            sockets.into_iter().collect();
        let mut pairs = Vec::with_capacity(records.len());
        let mut id = 0u64;
        while let Some((buffers, record)) = records.pop_front() {
            match sockets.remove(&id) {
                Some(socket) => {
                    #[cfg(feature = "tls")]
                    let tls = match (carried.is_empty(), &self.tls) {
                        (true, _) => None,
                        (false, Some(config)) => carried.restore(id, config).map_err(tls_setup)?,
                        (false, None) => {
                            return Err(tls_setup(
                                "TLS sessions were handed over and this image has no TLS configuration: call Server::tls before ready",
                            ));
                        }
                    };
                    #[cfg(not(feature = "tls"))]
                    let tls = ();
                    pairs.push((buffers, record, socket, tls));
                }
                None => tracing::warn!("lost a session: session {id}'s socket was not handed over"),
            }
            id += 1;
        }
        // The sessions someone is waiting on first (input is buffered),
        // then the busy ones (the previous image handed them over first):
        // the application spawns their tasks first, so they serve before
        // the idle ones have even run once.
        let waiting = active_first::<T>(&mut pairs);
        // Registered with tokio on the runtime's workers, a share each: from
        // this thread, each registration would wake the worker that waits
        // for events, a thread switch per session.
        let count = pairs.len();
        let share = count.div_ceil(WORKER_SHARES).max(1);
        let mut restoring = Vec::with_capacity(WORKER_SHARES);
        while !pairs.is_empty() {
            let rest = pairs.split_off(share.min(pairs.len()));
            let part = std::mem::replace(&mut pairs, rest);
            restoring.push(::tokio::spawn(async move {
                part.into_iter()
                    .map(restore::<T>)
                    .collect::<Result<Vec<T>, Error>>()
            }));
        }
        let mut sessions = Vec::with_capacity(count);
        for part in restoring {
            // Before `ready`: an error (or a panic in `Session::restore`)
            // rolls back, every client kept.
            let part = part.await.map_err(|e| Error::Setup {
                what: "restore the sessions",
                source: std::io::Error::other(e.to_string()),
            })?;
            sessions.extend(part?);
        }
        self.co.ready()?;
        tracing::debug!(
            sessions = sessions.len(),
            waiting,
            restore_ms = started.elapsed().as_secs_f64() * 1e3,
            "sessions restored"
        );
        Ok(sessions)
    }

    /// Spawns a session's task: like `tokio::spawn`, with a safe point the
    /// task reaches through [`pause_requested`] and [`hold`]. `name` (the
    /// peer's address, say) names the task in a refusal if it does not
    /// reach its safe point in time.
    pub fn spawn<F>(&self, name: impl std::fmt::Display, task: F) -> ::tokio::task::JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let point = Arc::new(self.quiesce.join_as(name.to_string()));
        ::tokio::spawn(POINT.scope(point, task))
    }

    /// The next connection on `listener`, handling the runtime's events
    /// meanwhile (see [`handle`](Self::handle)); `None` on SIGTERM or
    /// SIGINT. A failed `accept` (out of descriptors, a connection reset
    /// before it was accepted) is logged and tried again 10 ms later: it
    /// never ends the server. Not cancel-safe while it handles an upgrade:
    /// await it to its end, do not race it in a `select!` (use
    /// [`next_event`](Self::next_event) there).
    ///
    /// # Errors
    ///
    /// None today; the `Result` leaves room (the server's `?` stays).
    pub async fn accept(
        &mut self,
        listener: &TcpListener,
    ) -> std::io::Result<Option<(TcpStream, SocketAddr)>> {
        loop {
            let event = ::tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => return Ok(Some(accepted)),
                    Err(e) => {
                        tracing::warn!("accepting a connection failed: {e}; trying again");
                        ::tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                event = self.co.next_event() => event,
            };
            if self.handle(event).await == Handled::Shutdown {
                return Ok(None);
            }
        }
    }

    /// The runtime's next event; cancel-safe, for the main task's
    /// `select!`. Hand it to [`handle`](Self::handle).
    pub async fn next_event(&mut self) -> Event {
        self.co.next_event().await
    }

    /// Handles an event: on [`Event::Upgrade`] starts the probe; on
    /// [`Event::UpgradeApproved`] pauses every session's task (each holds
    /// in place, see [`hold`]) and commits with what they handed over
    /// (which, on success, never returns; otherwise every task goes on).
    /// Call it in the body of a `select!` arm, not in a future `select!`
    /// may drop: it awaits the pause. (Dropped during the pause, it
    /// abandons the upgrade: refused, every task goes on.)
    pub async fn handle(&mut self, event: Event) -> Handled {
        match event {
            Event::Upgrade => {
                // The probe checks that the new build reads this state.
                let kept = keep(&self.listeners, &[]);
                let _ = self.co.upgrade(&Sessions::default(), &kept);
            }
            // Its sockets are handed over as copies its tasks keep open: a
            // staying old process would keep every connection from ending.
            Event::UpgradeApproved if self.co.migration_stays() => self.co.abandon(
                "copyover::tokio::Server cannot stay after a migration (its tasks keep copies of the sockets): migrate without --stay",
            ),
            Event::UpgradeApproved => {
                // Dropped during the pause (the caller raced this future):
                // the upgrade is abandoned, not left under way for good.
                let mut guard = AbandonOnDrop(Some(&mut self.co));
                let paused = self.quiesce.pause().await;
                let Some(co) = guard.0.take() else {
                    return Handled::Serving;
                };
                match paused {
                    Ok(held) => {
                        commit(co, &self.listeners, held);
                        // Back only if the commit did not happen: every
                        // task goes on, and the copies it handed over are
                        // closed.
                        self.quiesce.resume();
                    }
                    Err(unpaused) => co.abandon(&unpaused.to_string()),
                }
            }
            // Its sessions move only all at once.
            Event::ShareApproved => self.co.abandon(
                "copyover::tokio::Server does not move users a batch at a time: migrate it whole (SIGUSR2, or copyover migrate without --batch)",
            ),
            Event::Shutdown => return Handled::Shutdown,
            _ => {}
        }
        Handled::Serving
    }

    /// The [`AsyncCopyover`], for everything else ([`generation`](Copyover::generation), ...).
    pub fn copyover(&mut self) -> &mut AsyncCopyover<Sessions<T>> {
        &mut self.co
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Plain(TcpStream);

    impl Session for Plain {
        type Transport = TcpStream;
        type Record = u32;
        fn transport(&self) -> &TcpStream {
            &self.0
        }
        fn save(&mut self) -> u32 {
            0
        }
        fn restore(_: u32, transport: TcpStream) -> Plain {
            Plain(transport)
        }
    }

    #[test]
    fn sessions_with_unread_input_come_first_the_others_in_their_order() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut peers = Vec::new();
        let mut pairs: Vec<Pair<Plain>> = (0..4u32)
            .map(|i| {
                peers.push(std::net::TcpStream::connect(addr).unwrap());
                let (socket, _) = listener.accept().unwrap();
                let bytes = |n| if i == n { b"line".to_vec() } else { Vec::new() };
                let buffers = Buffers {
                    unread: bytes(2),
                    unsent: bytes(1),
                };
                (buffers, i, socket, Default::default())
            })
            .collect();
        // The third session has unread input, the second unsent output.
        assert_eq!(active_first::<Plain>(&mut pairs), 1);
        let order: Vec<u32> = pairs.iter().map(|(_, record, ..)| *record).collect();
        assert_eq!(order, [2, 0, 1, 3]);
    }
}
