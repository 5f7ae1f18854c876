//! `tokio-chat.rs` over TLS 1.3: the same chat, each client's TLS session
//! crossing the upgrade with it (same session, no new handshake). The
//! changes from `tokio-chat.rs`: the transport (a `Framed` of
//! `copyover::tls::TlsStream`), the certificate's arguments, the TLS
//! configuration given to the server, each accepted socket wrapped.
//!
//! `tokio-chat-tls ADDR CERT.pem KEY.pem`; try it with `openssl s_client`.

use std::collections::HashMap;
use std::error::Error;
use std::net::SocketAddr;
use std::sync::Arc;

use copyover::tls::TlsStream;
use copyover::tokio::{Server, Session, hold, pause_requested};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpListener;
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
    lines: Framed<TlsStream, LinesCodec>,
    /// Set once the client answered the prompt.
    name: Option<String>,
    tx: Tx,
    rx: Rx,
}

impl Client {
    fn new(addr: SocketAddr, lines: Framed<TlsStream, LinesCodec>) -> Client {
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
    type Transport = Framed<TlsStream, LinesCodec>;
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
    let config = copyover::Config::new("tokio-chat-tls", LABEL.unwrap_or("v1"));
    copyover::tokio::serve(config, run)
}

async fn run(mut server: Server<Client>) -> Result<(), Box<dyn Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:6142".into());
    let (cert, key) = match (std::env::args().nth(2), std::env::args().nth(3)) {
        (Some(cert), Some(key)) => (cert, key),
        _ => return Err("usage: tokio-chat-tls ADDR CERT.pem KEY.pem".into()),
    };
    let tls = copyover::tls::Config::from_pem_files(cert, key)?;
    server.tls(tls.clone());
    let shared = Arc::new(Mutex::new(Shared::default()));
    let listener: TcpListener = server.tcp_listener("listener", &addr).await?;
    assert!(LABEL != Some("bad"), "a bad build");
    spawn_all(server.ready().await?, &shared, &server).await;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    loop {
        let Some((stream, addr)) = server.accept(&listener).await? else {
            return Ok(());
        };
        let stream = TlsStream::accept(stream, &tls)?;
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
