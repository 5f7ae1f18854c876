//! The bench server: a line echo ("pong") over TCP with an arbitrary state
//! size (bulk bytes and many small records), upgraded in place by copyover.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;

use copyover::{AppState, Config, Event, Handoff, Start};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
    sockopt,
};
use serde::{Deserialize, Serialize};

/// Bytes serialized as one blob (postcard writes a length and the bytes),
/// not as a sequence of `u8` values.
#[derive(Debug, Default)]
pub struct Blob(pub Vec<u8>);

impl Serialize for Blob {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Blob;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Blob, E> {
                Ok(Blob(v.to_vec()))
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Blob, E> {
                Ok(Blob(v))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// A small record, as a game or chat server keeps per player.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Record {
    pub id: u64,
    pub name: String,
    pub score: u32,
}

/// The bench server's state.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct BenchState {
    pub conns: Vec<u64>,
    pub next_id: u64,
    pub bulk: Blob,
    pub records: Vec<Record>,
}

impl AppState for BenchState {
    const VERSION: u32 = 1;
}

/// `copyover-bench serve`'s options.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Bytes of bulk state (serialized at every upgrade).
    #[arg(long, value_name = "BYTES", default_value_t = 1024)]
    pub bulk: usize,
    /// Small records in the state (about 32 bytes each once encoded).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub records: usize,
    /// Bytes of bulk state kept in a `copyover::Region` (not serialized).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub region: usize,
}

const TOKEN_LISTENER: u64 = u64::MAX;
const TOKEN_EVENTS: u64 = u64::MAX - 1;

/// A listener with a deep accept queue: 10,000 clients connect at once.
fn bind_listener(addr: SocketAddr) -> Result<TcpListener, Box<dyn std::error::Error>> {
    let fd: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    listen(&fd, Backlog::new(4096)?)?;
    Ok(TcpListener::from(fd))
}

pub fn serve(args: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    raise_nofile_limit();
    // Probing a gigabyte of serialized state (writing it, then the new
    // binary reading and decoding it) takes more than the default 5 s on a
    // small VM; the probe runs while the old image serves, so a longer
    // limit costs no client anything.
    let config =
        Config::new("copyover-bench", "bench").probe_timeout(std::time::Duration::from_secs(60));
    let (mut co, start) = copyover::boot::<BenchState>(config)?;
    // The epoll instance itself crosses the exec (it is kept in the
    // handoff), and with it every registration: a resumed image registers
    // only the runtime's new event fd, not 10,000 connections again.
    let mut region = None;
    let (mut state, listener, mut conns, epoll, kept) = match start {
        Start::Fresh => {
            if args.region > 0 {
                let mut r = copyover::Region::new(args.region)?;
                for (i, b) in r.as_mut_slice().iter_mut().enumerate() {
                    *b = (i % 251) as u8;
                }
                region = Some(r);
            }
            let state = BenchState {
                bulk: Blob((0..args.bulk).map(|i| (i % 251) as u8).collect()),
                records: (0..args.records as u64)
                    .map(|id| Record {
                        id,
                        name: format!("player-{id}"),
                        score: id as u32,
                    })
                    .collect(),
                ..BenchState::default()
            };
            let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
            (
                state,
                bind_listener(args.listen)?,
                HashMap::new(),
                epoll,
                false,
            )
        }
        Start::Resumed { state, mut fds } => {
            region = fds.take_region("bulk")?;
            let listener = fds.take_tcp_listener("listener")?.ok_or("no listener")?;
            let conns: HashMap<u64, TcpStream> =
                fds.take_tcp_streams("conn")?.into_iter().collect();
            match fds.take_fd("epoll")? {
                Some(fd) => (state, listener, conns, Epoll(fd), true),
                None => (
                    state,
                    listener,
                    conns,
                    Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
                    false,
                ),
            }
        }
    };
    let ev = |token| EpollEvent::new(EpollFlags::EPOLLIN, token);
    epoll.add(co.event_fd(), ev(TOKEN_EVENTS))?;
    if !kept {
        epoll.add(&listener, ev(TOKEN_LISTENER))?;
        for (id, s) in &conns {
            epoll.add(s, ev(*id))?;
        }
    }
    co.ready()?;
    tracing::info!(addr = %listener.local_addr()?, clients = conns.len(), "listening");
    let mut events = vec![EpollEvent::empty(); 1024];
    let mut buf = vec![0u8; 16 * 1024];
    let mut replies = Vec::new();
    loop {
        let n = match epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_LISTENER => {
                    while let Ok((s, _)) = listener.accept() {
                        s.set_nonblocking(true)?;
                        let id = state.next_id;
                        state.next_id += 1;
                        epoll.add(&s, EpollEvent::new(EpollFlags::EPOLLIN, id))?;
                        conns.insert(id, s);
                    }
                }
                TOKEN_EVENTS => {
                    while let Some(event) = co.poll() {
                        match event {
                            Event::Upgrade | Event::UpgradeApproved => {
                                state.conns = conns.keys().copied().collect();
                                let mut keep = Handoff::new();
                                keep.listener("listener", &listener);
                                keep.other("epoll", &epoll.0);
                                if let Some(r) = &region {
                                    keep.region("bulk", r);
                                }
                                keep.streams("conn", conns.iter().map(|(id, s)| (*id, s)));
                                let _ = co.upgrade(&state, &keep);
                            }
                            Event::Shutdown => return Ok(()),
                            _ => {}
                        }
                    }
                }
                id => {
                    let Some(s) = conns.get_mut(&id) else {
                        continue;
                    };
                    if !pong(s, &mut buf, &mut replies) {
                        let _ = epoll.delete(&*s);
                        conns.remove(&id);
                    }
                }
            }
        }
    }
}

/// Answers every newline received with `pong\n`; false when the peer left.
fn pong(s: &mut TcpStream, buf: &mut [u8], replies: &mut Vec<u8>) -> bool {
    replies.clear();
    loop {
        match s.read(buf) {
            Ok(0) => return false,
            Ok(n) => {
                let lines = buf[..n].iter().filter(|b| **b == b'\n').count();
                for _ in 0..lines {
                    replies.extend_from_slice(b"pong\n");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    // Replies are tiny; a full socket buffer here means a stuck client.
    let mut at = 0;
    while at < replies.len() {
        match s.write(&replies[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(_) => return false,
        }
    }
    true
}

/// Raises the soft RLIMIT_NOFILE to the hard limit.
pub fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
