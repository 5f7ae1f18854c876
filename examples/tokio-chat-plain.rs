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

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};
use tokio_util::codec::{Encoder, Framed, LinesCodec};
use tracing_subscriber::EnvFilter;

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

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(filter)
        .init();
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:6142".into());
    let shared = Arc::new(Mutex::new(Shared::default()));
    let listener = TcpListener::bind(&addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    loop {
        let (stream, addr) = listener.accept().await?;
        let mut client = Client::new(addr, Framed::new(stream, LinesCodec::new()));
        client.queue("Please enter your username:".into());
        tokio::spawn(process(Arc::clone(&shared), client));
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
        SinkExt::<String>::flush(&mut client.lines).await?;
        tokio::select! {
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
