//! A line chat on tokio in the style of tokio's own `examples/chat.rs`: a
//! multi-threaded runtime, one task per client, a shared map of the peers'
//! inboxes. `tokio-chat-plain.rs` knows nothing of copyover; `tokio-chat.rs`
//! is the same chat upgradeable in place (SIGHUP: a new build takes over at
//! the same PID, every client keeps its connection, its name, its half-typed
//! line and the messages not yet written to it). The README shows the diff.

use std::collections::HashMap;
use std::error::Error;
use std::net::SocketAddr;
use std::sync::Arc;

use copyover::tokio::{Server, Session, hold, pause_requested};
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};
use tokio_util::codec::{Encoder, Framed, LinesCodec};
use tracing_subscriber::EnvFilter;

// Test builds: a label (`bad` panics), and no safe point in a write.
const LABEL: Option<&str> = option_env!("COPYOVER_CHAT_LABEL");
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
}

/// What crosses an upgrade: the socket, its buffers, and this record.
impl Session for Client {
    type Transport = Framed<TcpStream, LinesCodec>;
    type Record = (SocketAddr, Option<String>);
    fn transport(&self) -> &Self::Transport {
        &self.lines
    }
    fn save(&mut self) -> Self::Record {
        while let Ok(message) = self.rx.try_recv() {
            self.queue(message);
        }
        (self.addr, self.name.clone())
    }
    fn restore((addr, name): Self::Record, lines: Self::Transport) -> Client {
        let client = Client::new(addr, lines);
        Client { name, ..client }
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(filter)
        .init();
    let config = copyover::Config::new("tokio-chat", LABEL.unwrap_or("v1"));
    copyover::tokio::serve(config, run)
}

async fn run(mut server: Server<Client>) -> Result<(), Box<dyn Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:6142".into());
    let shared = Arc::new(Mutex::new(Shared::default()));
    let listener: TcpListener = server.tcp_listener("listener", &addr).await?;
    assert!(LABEL != Some("bad"), "a bad build");
    spawn_all(server.ready().await?, &shared, &server).await;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    loop {
        let Some((stream, addr)) = server.accept(&listener).await? else {
            return Ok(());
        };
        let mut client = Client::new(addr, Framed::new(stream, LinesCodec::new()));
        client.queue("Please enter your username:".into());
        server.spawn(addr, process(Arc::clone(&shared), client));
    }
}

/// A task per restored client, every one in the map before any task runs.
async fn spawn_all(clients: Vec<Client>, shared: &Arc<Mutex<Shared>>, server: &Server<Client>) {
    let mut peers = shared.lock().await;
    for client in clients {
        if client.name.is_some() {
            peers.peers.insert(client.addr, client.tx.clone());
        }
        server.spawn(client.addr, process(Arc::clone(shared), client));
    }
}

/// Serves one client until it leaves.
async fn process(shared: Arc<Mutex<Shared>>, mut client: Client) {
    if let Err(e) = serve(&shared, &mut client).await {
        tracing::warn!(addr = %client.addr, "connection failed: {e}");
    }
    if let Some(name) = &client.name {
        let mut shared = shared.lock().await;
        shared.peers.remove(&client.addr);
        shared.broadcast(client.addr, &format!("{name} has left the chat"));
    }
}

async fn serve(shared: &Mutex<Shared>, client: &mut Client) -> Result<(), Box<dyn Error>> {
    loop {
        tokio::select! {
            flushed = SinkExt::<String>::flush(&mut client.lines) => flushed?,
            () = pause_requested(), if !NAIVE => hold(client).await,
        }
        tokio::select! {
            () = pause_requested() => hold(client).await,
            Some(message) = client.rx.recv() => client.queue(message),
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
                None => return Ok(()),
            },
        }
    }
}
