//! A line chat on tokio, in the style of tokio's own `examples/chat.rs`, that
//! upgrades in place: on SIGHUP a new build takes over at the same PID and
//! every client stays connected, with its name, its half-typed line and the
//! messages not yet written to it. `tokio-chat-plain.rs` is the same chat
//! without copyover; the README shows the diff.
//!
//! ```sh
//! cargo run --example tokio-chat --features tokio -- 127.0.0.1:6142
//! COPYOVER_CHAT_LABEL=v2 cargo build --example tokio-chat --features tokio
//! kill -HUP $(pgrep -f 'examples/tokio-chat')
//! ```

use std::collections::HashMap;
use std::error::Error;
use std::net::SocketAddr;
use std::sync::Arc;

use copyover::tokio::{AsyncCopyover, Quiesce, SafePoint, TakeTokio};
use copyover::{AppState, Config, Event, Handoff, Start};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};
use tokio_util::codec::{Encoder, Framed, FramedParts, LinesCodec};
use tracing_subscriber::EnvFilter;

/// The build's label (tests build a `v2`), and a bad release for the tests:
/// `COPYOVER_CHAT_FAULT=panic` panics after adopting the sockets.
const LABEL: &str = match option_env!("COPYOVER_CHAT_LABEL") {
    Some(l) => l,
    None => "v1",
};
const FAULT: Option<&str> = option_env!("COPYOVER_CHAT_FAULT");

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

/// What crosses the exec: every client, with its socket named `conn:ADDR`.
#[derive(Serialize, Deserialize, Default)]
struct Saved {
    clients: Vec<SavedClient>,
}

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
    fn new(addr: SocketAddr, stream: TcpStream) -> Client {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut client = Client {
            addr,
            lines: Framed::new(stream, LinesCodec::new()),
            name: None,
            tx,
            rx,
        };
        client.queue("Please enter your username:".into());
        client
    }

    /// Adds a line to the output buffer; the task's loop writes it.
    fn queue(&mut self, line: String) {
        let _ = LinesCodec::new().encode(line, self.lines.write_buffer_mut());
    }

    /// Its record, once every task is paused: messages still in its inbox
    /// join the unsent output.
    fn save(&mut self) -> SavedClient {
        while let Ok(message) = self.rx.try_recv() {
            self.queue(message);
        }
        SavedClient {
            addr: self.addr,
            name: self.name.clone(),
            unread: self.lines.read_buffer().to_vec(),
            unsent: self.lines.write_buffer().to_vec(),
        }
    }

    fn restore(saved: SavedClient, stream: TcpStream) -> Client {
        let mut parts = FramedParts::new::<String>(stream, LinesCodec::new());
        parts.read_buf = saved.unread[..].into();
        parts.write_buf = saved.unsent[..].into();
        let (tx, rx) = mpsc::unbounded_channel();
        let (addr, name) = (saved.addr, saved.name);
        let lines = Framed::from_parts(parts);
        Client {
            addr,
            lines,
            name,
            tx,
            rx,
        }
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(filter)
        .init();
    // First, before any thread: copyover, then the runtime.
    let (co, start) = copyover::boot::<Saved>(Config::new("tokio-chat", LABEL))?;
    copyover::tokio::runtime()?.block_on(run(co, start))
}

async fn run(co: copyover::Copyover, start: Start<Saved>) -> Result<(), Box<dyn Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:6142".into());
    let shared = Arc::new(Mutex::new(Shared::default()));
    let mut co = AsyncCopyover::new(co)?;
    let quiesce = Quiesce::new();
    let (listener, clients) = match start {
        Start::Fresh => (TcpListener::bind(&addr).await?, Vec::new()),
        Start::Resumed { state, mut fds } => {
            let listener = fds.take_tokio_tcp_listener("listener")?;
            let mut clients = Vec::new();
            for saved in state.clients {
                if let Some(s) = fds.take_tokio_tcp_stream(&format!("conn:{}", saved.addr))? {
                    clients.push(Client::restore(saved, s));
                }
            }
            assert!(
                FAULT != Some("panic"),
                "fault build: a panic after adoption"
            );
            (listener.ok_or("no listener was handed over")?, clients)
        }
    };
    // Ready before any task touches a socket: until then a rollback could
    // bring back the old image, which would say the same things again.
    co.ready()?;
    spawn_all(&shared, &quiesce, clients).await;
    tracing::info!(addr = %listener.local_addr()?, version = LABEL, "listening");
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, addr) = accepted?;
                let client = Client::new(addr, stream);
                tokio::spawn(process(Arc::clone(&shared), client, quiesce.join()));
            }
            event = co.next_event() => match event {
                Event::Upgrade => {
                    // The probe checks that the new build reads our state.
                    let mut keep = Handoff::new();
                    keep.listener("listener", &listener);
                    let _ = co.upgrade(&Saved::default(), &keep);
                }
                Event::UpgradeApproved => {
                    let mut parked = quiesce.pause().await;
                    let clients = parked.iter_mut().map(Client::save).collect();
                    let mut keep = Handoff::new();
                    keep.listener("listener", &listener);
                    for c in &parked {
                        keep.stream(format!("conn:{}", c.addr), c.lines.get_ref());
                    }
                    // Returns only if the commit failed: serve on.
                    let _ = co.upgrade(&Saved { clients }, &keep);
                    quiesce.resume();
                    spawn_all(&shared, &quiesce, parked).await;
                }
                Event::Shutdown => return Ok(()),
                _ => {}
            },
        }
    }
}

/// Starts a task per client (resumed, or back from a failed commit).
async fn spawn_all(shared: &Arc<Mutex<Shared>>, quiesce: &Quiesce<Client>, clients: Vec<Client>) {
    let mut peers = shared.lock().await;
    for client in clients {
        if client.name.is_some() {
            peers.peers.insert(client.addr, client.tx.clone());
        }
        tokio::spawn(process(Arc::clone(shared), client, quiesce.join()));
    }
}

/// Serves one client until it leaves, or hands it back for an upgrade.
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
            Some(message) = client.rx.recv() => client.queue(message),
            line = client.lines.next() => match line {
                Some(Ok(line)) => {
                    let mut shared = shared.lock().await;
                    match &client.name {
                        None => {
                            shared.peers.insert(client.addr, client.tx.clone());
                            shared.broadcast(client.addr, &format!("{line} has joined the chat"));
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
