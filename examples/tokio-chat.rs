//! A line chat on tokio in the style of tokio's own `examples/chat.rs`: a
//! multi-threaded runtime, one task per client, a shared map of the peers'
//! inboxes. `tokio-chat-plain.rs` knows nothing of copyover; `tokio-chat.rs`
//! is the same chat upgradeable in place (SIGHUP: a new build takes over at
//! the same PID, every client keeps its connection, its name, its half-typed
//! line and the messages not yet written to it). The README shows the diff.

use std::collections::HashMap;
use std::error::Error;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use copyover::tokio::{AsyncCopyover, Quiesce, SafePoint, TakeTokio};
use copyover::{AppState, Config, Copyover, Event, Handoff, Start};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};
use tokio_util::codec::{Encoder, Framed, FramedParts, LinesCodec};
use tracing_subscriber::EnvFilter;

/// The build's label; the tests build a `v2`, and a `bad` one that panics
/// after adopting the sockets (it is rolled back).
const LABEL: Option<&str> = option_env!("COPYOVER_CHAT_LABEL");
/// A build that writes each message with `send(..).await` outside the safe
/// point, as tokio's own chat does: a client that stops reading holds its
/// task there, and the pause for an upgrade ends without it (refused, every
/// task going on).
const NAIVE: bool = option_env!("COPYOVER_CHAT_NAIVE").is_some();

type Tx = mpsc::UnboundedSender<String>;
type Rx = mpsc::UnboundedReceiver<String>;

/// What the tasks share: the inbox of every client that gave its name.
#[derive(Default)]
struct Shared {
    peers: HashMap<SocketAddr, Tx>,
}

impl Shared {
    /// Sends `message` to everyone but `sender`.
    fn broadcast(&self, sender: SocketAddr, message: &str) {
        for (addr, tx) in &self.peers {
            if *addr != sender {
                let _ = tx.send(message.to_string());
            }
        }
    }
}

/// One client, owned by its task.
struct Client {
    addr: SocketAddr,
    lines: Framed<TcpStream, LinesCodec>,
    /// Set once the client answered the prompt.
    name: Option<String>,
    tx: Tx,
    rx: Rx,
}

/// What crosses the exec: each client's socket (`conn:ADDR`) and record.
#[derive(Serialize, Deserialize, Default)]
struct Saved(Vec<SavedClient>);

impl AppState for Saved {
    const VERSION: u32 = 1;
}

#[derive(Serialize, Deserialize)]
struct SavedClient {
    addr: SocketAddr,
    name: Option<String>,
    unread: Vec<u8>,
    unsent: Vec<u8>,
}

impl Client {
    fn new(addr: SocketAddr, lines: Framed<TcpStream, LinesCodec>) -> Client {
        let (tx, rx) = mpsc::unbounded_channel();
        let name = None;
        Client {
            addr,
            lines,
            name,
            tx,
            rx,
        }
    }

    /// Adds a line to the output buffer; the task's loop writes it.
    fn queue(&mut self, line: String) {
        let _ = LinesCodec::new().encode(line, self.lines.write_buffer_mut());
    }

    /// Its record, once every task is parked (its inbox joins the output).
    fn save(&mut self) -> SavedClient {
        while let Ok(message) = self.rx.try_recv() {
            self.queue(message);
        }
        let (unread, unsent) = (self.lines.read_buffer(), self.lines.write_buffer());
        let (unread, unsent) = (unread.to_vec(), unsent.to_vec());
        let (addr, name) = (self.addr, self.name.clone());
        SavedClient {
            addr,
            name,
            unread,
            unsent,
        }
    }

    fn restore(saved: SavedClient, s: std::net::TcpStream, tx: Tx, rx: Rx) -> io::Result<Client> {
        let mut parts = FramedParts::new::<String>(TcpStream::from_std(s)?, LinesCodec::new());
        (parts.read_buf, parts.write_buf) = (saved.unread[..].into(), saved.unsent[..].into());
        let client = Client::new(saved.addr, Framed::from_parts(parts));
        let name = saved.name;
        Ok(Client {
            name,
            tx,
            rx,
            ..client
        })
    }
}

/// The listener and the clients' sockets, by name.
fn keep<'a>(listener: &'a TcpListener, clients: &'a [Client]) -> Handoff<'a> {
    let mut keep = Handoff::new();
    keep.listener("listener", listener);
    for c in clients {
        keep.stream(format!("conn:{}", c.addr), c.lines.get_ref());
    }
    keep
}

fn main() -> Result<(), Box<dyn Error>> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(filter)
        .init();
    // copyover first, before any thread; then the runtime.
    let (co, start) = copyover::boot(Config::new("tokio-chat", LABEL.unwrap_or("v1")))?;
    copyover::tokio::runtime()?.block_on(run(co, start))
}

async fn run(co: Copyover<Saved>, start: Start<Saved>) -> Result<(), Box<dyn Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:6142".into());
    let shared = Arc::new(Mutex::new(Shared::default()));
    let (mut co, quiesce) = (AsyncCopyover::new(co)?, Quiesce::new());
    let mut clients = Vec::new();
    let listener = match start {
        Start::Fresh => TcpListener::bind(&addr).await?,
        Start::Resumed { state, mut fds } => {
            for saved in state.0 {
                if let Some(s) = fds.take_tcp_stream(&format!("conn:{}", saved.addr))? {
                    clients.push((saved, s));
                }
            }
            assert!(LABEL != Some("bad"), "a bad build");
            fds.take_tokio_tcp_listener("listener")?
                .ok_or("no listener")?
        }
    };
    // Ready before any task touches a socket (a rollback would repeat it).
    co.ready()?;
    let mut peers = shared.lock().await;
    let mut inboxes = Vec::with_capacity(clients.len());
    for (saved, _) in &clients {
        let (tx, rx) = mpsc::unbounded_channel();
        if saved.name.is_some() {
            peers.peers.insert(saved.addr, tx.clone());
        }
        inboxes.push((tx, rx));
    }
    drop(peers);
    for ((saved, stream), (tx, rx)) in clients.into_iter().zip(inboxes) {
        let (shared, safe) = (Arc::clone(&shared), quiesce.join_as(saved.addr.to_string()));
        // Registered with tokio in its own task: cheaper (see copyover::tokio).
        tokio::spawn(async move {
            match Client::restore(saved, stream, tx, rx) {
                Ok(client) => process(shared, client, safe).await,
                Err(e) => tracing::warn!("lost a client: {e}"),
            }
        });
    }
    tracing::info!(addr = %listener.local_addr()?, "listening");
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, addr) = accepted?;
                let mut client = Client::new(addr, Framed::new(stream, LinesCodec::new()));
                client.queue("Please enter your username:".into());
                tokio::spawn(process(Arc::clone(&shared), client, quiesce.join_as(addr.to_string())));
            }
            event = co.next_event() => match event {
                // The probe checks that the new build reads our state.
                Event::Upgrade => drop(co.upgrade(&Saved::default(), &keep(&listener, &[]))),
                Event::UpgradeApproved => match quiesce.pause().await {
                    Ok(mut parked) => {
                        let saved = Saved(parked.iter_mut().map(Client::save).collect());
                        // Returns only if the commit failed: serve on.
                        let _ = co.upgrade(&saved, &keep(&listener, &parked));
                        quiesce.resume();
                        spawn_all(&shared, &quiesce, parked).await;
                    }
                    // A task did not reach a safe point in time: no upgrade.
                    Err(unpaused) => {
                        co.abandon(&unpaused.to_string());
                        spawn_all(&shared, &quiesce, unpaused.parked).await;
                    }
                },
                Event::Shutdown => return Ok(()),
                _ => {}
            },
        }
    }
}

/// Starts a task per client (resumed, or back from a failed commit).
async fn spawn_all(shared: &Arc<Mutex<Shared>>, quiesce: &Quiesce<Client>, clients: Vec<Client>) {
    let mut shared_now = shared.lock().await;
    for client in clients {
        if client.name.is_some() {
            shared_now.peers.insert(client.addr, client.tx.clone());
        }
        let safe = quiesce.join_as(client.addr.to_string());
        tokio::spawn(process(Arc::clone(shared), client, safe));
    }
}

/// Serves one client until it leaves, or parks it for an upgrade.
async fn process(shared: Arc<Mutex<Shared>>, mut client: Client, mut safe: SafePoint<Client>) {
    match serve(&shared, &mut client, &mut safe).await {
        Ok(true) => return safe.park(client),
        Ok(false) => {}
        Err(e) => tracing::warn!(addr = %client.addr, "connection failed: {e}"),
    }
    if let Some(name) = &client.name {
        let mut shared = shared.lock().await;
        shared.peers.remove(&client.addr);
        shared.broadcast(client.addr, &format!("{name} has left the chat"));
    }
}

/// `Ok(true)`: paused at a safe point.
async fn serve(
    shared: &Mutex<Shared>,
    client: &mut Client,
    safe: &mut SafePoint<Client>,
) -> Result<bool, Box<dyn Error>> {
    loop {
        tokio::select! {
            flushed = SinkExt::<String>::flush(&mut client.lines) => flushed?,
            () = safe.requested() => return Ok(true),
        }
        tokio::select! {
            () = safe.requested() => return Ok(true),
            Some(message) = client.rx.recv() => if NAIVE {
                client.lines.send(message).await?;
            } else {
                client.queue(message);
            },
            line = client.lines.next() => match line {
                Some(Ok(line)) => {
                    let mut shared = shared.lock().await;
                    match &client.name {
                        None => {
                            shared.peers.insert(client.addr, client.tx.clone());
                            shared.broadcast(client.addr, &format!("{line} has joined the chat"));
                            client.queue(format!("Welcome, {line}!"));
                            client.name = Some(line);
                        }
                        Some(name) => shared.broadcast(client.addr, &format!("{name}: {line}")),
                    }
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(false),
            },
        }
    }
}
