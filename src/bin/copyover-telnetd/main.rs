//! copyover-telnetd: a small multi-user telnet chat that upgrades in place.
//!
//! Connect with `telnet 127.0.0.1 2323`, deploy a new build over the binary,
//! `kill -HUP` the server: nobody is disconnected. See docs/telnet-demo.md.

mod chat;
mod gradual;
mod telnet;
mod tls;

use std::collections::{BTreeSet, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use copyover::{Config, Copyover, Event, Handoff, Start};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use chat::{Chat, FAULT};

/// The build label, fixed at compile time.
const LABEL: &str = match option_env!("COPYOVER_DEMO_LABEL") {
    Some(l) => l,
    None => env!("CARGO_PKG_VERSION"),
};
const APP: &str = "copyover-telnetd";
/// The application name in snapshots; the `wrong-app` fault build claims to
/// be another application.
const APP_NAME: &str = if chat::env_is(FAULT, "wrong-app") {
    "not-telnetd"
} else {
    APP
};
const LISTENER: &str = "listener:telnet";
/// The connections' prefix in the handoff: `conn:ID`.
const CONN: &str = "conn";
const EPOLL: &str = "epoll";
const TOKEN_LISTENER: u64 = u64::MAX;
const TOKEN_EVENTS: u64 = u64::MAX - 1;
const TOKEN_TLS_LISTENER: u64 = u64::MAX - 2;

const USAGE: &str = "\
copyover-telnetd: a telnet chat that upgrades in place without dropping anyone

USAGE:
    copyover-telnetd [OPTIONS]

OPTIONS:
    --listen ADDR           address to listen on [default: 127.0.0.1:2323];
                            a socket passed by systemd (LISTEN_FDS) wins
    --tls-listen ADDR       also serve the chat over TLS 1.3 on ADDR (with
                            --tls-cert and --tls-key); TLS sessions cross
                            upgrades too, with no new handshake
    --tls-cert FILE         the TLS certificate chain, PEM, leaf first
    --tls-key FILE          its private key, PEM
    --ready-timeout SECS    how long a new build may take to resume before it
                            is rolled back [default: 10]
    --snapshot-file PATH    where SIGUSR1 saves a snapshot [default:
                            ./copyover-telnetd.snapshot]
    --restore-from PATH     start from a saved snapshot (names and variables,
                            no connections): a staging server
    --fdstore               under systemd, keep the listener, every connection
                            and a checkpoint of the state in the service's fd
                            store, so that a crash drops no one (the unit
                            needs FileDescriptorStoreMax=)
    --migration-socket      let another process of this chat, started anywhere
                            with COPYOVER_JOIN=DIR/PID.migration (DIR: the
                            status directory), take every client over
    --migration-uid UID     with --migration-socket: a user besides this
                            process's own whose process may take over
    -h, --help              print this help

SIGNALS:
    SIGHUP                  upgrade to the binary at this program's path
    SIGUSR2                 migrate: a new process of that binary takes every
                            client, then this one exits (`copyover migrate PID
                            --batch N` moves them N at a time, both serving)
    SIGUSR1                 save a snapshot to --snapshot-file
    SIGTERM, SIGINT         say goodbye to everyone and stop

Logs go to stderr; RUST_LOG filters them (default: info).
";

struct Args {
    listen: SocketAddr,
    tls: Option<TlsArgs>,
    ready_timeout: Duration,
    snapshot_file: PathBuf,
    restore_from: Option<PathBuf>,
    fdstore: bool,
    migration_socket: bool,
    migration_uids: Vec<u32>,
}

struct TlsArgs {
    listen: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
}

fn parse_args() -> Result<Option<Args>, String> {
    let (mut tls_listen, mut tls_cert, mut tls_key) = (None, None, None);
    let mut args = Args {
        listen: "127.0.0.1:2323".parse().map_err(|e| format!("{e}"))?,
        tls: None,
        ready_timeout: Duration::from_secs(10),
        snapshot_file: PathBuf::from("copyover-telnetd.snapshot"),
        restore_from: None,
        fdstore: false,
        migration_socket: false,
        migration_uids: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--listen" => {
                let v = value("--listen")?;
                args.listen = v.parse().map_err(|_| {
                    format!("--listen: {v:?} is not an address such as 127.0.0.1:2323")
                })?;
            }
            "--ready-timeout" => {
                let v = value("--ready-timeout")?;
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| {
                        format!("--ready-timeout: {v:?} is not a positive number of seconds")
                    })?;
                args.ready_timeout = Duration::from_secs_f64(secs);
            }
            "--snapshot-file" => args.snapshot_file = PathBuf::from(value("--snapshot-file")?),
            "--restore-from" => args.restore_from = Some(PathBuf::from(value("--restore-from")?)),
            "--fdstore" => args.fdstore = true,
            "--migration-socket" => args.migration_socket = true,
            "--migration-uid" => {
                let v = value("--migration-uid")?;
                args.migration_uids.push(
                    v.parse()
                        .map_err(|_| format!("--migration-uid: {v:?} is not a user id"))?,
                );
            }
            "--tls-listen" => {
                let v = value("--tls-listen")?;
                tls_listen = Some(v.parse().map_err(|_| {
                    format!("--tls-listen: {v:?} is not an address such as 127.0.0.1:2324")
                })?);
            }
            "--tls-cert" => tls_cert = Some(PathBuf::from(value("--tls-cert")?)),
            "--tls-key" => tls_key = Some(PathBuf::from(value("--tls-key")?)),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    args.tls = match (tls_listen, tls_cert, tls_key) {
        (None, None, None) => None,
        (Some(listen), Some(cert), Some(key)) => Some(TlsArgs { listen, cert, key }),
        _ => return Err("--tls-listen, --tls-cert and --tls-key go together".into()),
    };
    if !args.migration_uids.is_empty() && !args.migration_socket {
        return Err("--migration-uid needs --migration-socket".into());
    }
    Ok(Some(args))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("copyover-telnetd: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // `thread-on-rollback`: the same, only when this build comes back
    // after a failed upgrade (a good build whose environment changed: an
    // LD_PRELOAD library that starts a thread).
    let rolled_back = std::env::var("COPYOVER_HANDOFF").is_ok_and(|v| v.contains(":mode=rollback"));
    if FAULT == Some("thread-before-boot") || (FAULT == Some("thread-on-rollback") && rolled_back) {
        // What a static initializer, an LD_PRELOAD library or an async
        // runtime's main does: a thread before `boot`.
        std::thread::spawn(|| {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        });
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error>;

struct Server {
    co: Copyover<Chat>,
    epoll: Epoll,
    listener: TcpListener,
    /// Every connection's socket, plain or TLS, and whether it is
    /// registered for EPOLLOUT.
    streams: HashMap<u64, (TcpStream, bool)>,
    /// The TLS side, with `--tls-listen`.
    tls: Option<tls::Tls>,
    chat: Chat,
    args: Args,
    /// The listener is in the epoll set (not while a gradual migration's
    /// new process accepts).
    accepting: bool,
    /// Who was online here when the other process of a gradual migration
    /// was last told.
    online_sent: Option<Vec<(u64, String)>>,
    /// What the list was made from (connections, logins), last time.
    online_mark: Option<(usize, u64)>,
    /// Users that arrived from the other process whose registration with
    /// epoll failed: tried again every 10 ms.
    unregistered: Vec<u64>,
    late_tries: u32,
}

/// Every descriptor to keep across an upgrade.
fn handoff<'a>(
    listener: &'a TcpListener,
    epoll: &'a Epoll,
    streams: &'a HashMap<u64, (TcpStream, bool)>,
    tls: Option<&'a tls::Tls>,
) -> Handoff<'a> {
    let mut keep = Handoff::new();
    keep.listener(LISTENER, listener)
        .other(EPOLL, &epoll.0)
        .streams(
            CONN,
            streams
                .iter()
                .filter(|(id, _)| tls.is_none_or(|t| !t.conns.contains_key(id)))
                .map(|(id, (s, _))| (*id, s)),
        );
    if let Some(t) = tls {
        t.keep(&mut keep, streams);
    }
    keep
}

fn run(args: Args) -> Result<(), BoxError> {
    let mut config = Config::new(APP_NAME, LABEL)
        .ready_timeout(args.ready_timeout)
        .migration_socket(args.migration_socket);
    for uid in &args.migration_uids {
        config = config.migration_peer(*uid);
    }
    let (mut co, start) = copyover::boot::<Chat>(config)?;
    if args.fdstore && !co.enable_fdstore() {
        tracing::warn!(
            "--fdstore: not a systemd service (no NOTIFY_SOCKET); a crash drops everyone"
        );
    }
    // The epoll instance crosses the exec with the sockets: its
    // registrations (and their tokens, the connection ids) survive, so a
    // resumed image re-registers nothing but the runtime's new event fd.
    let (chat, listener, mut streams, epoll, mut fds) = match start {
        Start::Fresh => {
            let mut chat = Chat::default();
            if let Some(path) = &args.restore_from {
                chat = co.restore_from_file(path)?;
                chat.conns.clear();
                tracing::info!(path = ?path, users = chat.users.len(), "staging: restored names and variables");
            }
            // A listener passed by systemd socket activation (which its
            // socket unit keeps), or our own (kept in the fd store, if used).
            let listener = match co.take_activated_tcp_listener(None)? {
                Some(l) => l,
                None => {
                    let l = TcpListener::bind(args.listen)
                        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
                    co.store_fd(LISTENER, l.as_fd())?;
                    l
                }
            };
            (chat, listener, HashMap::new(), None, None)
        }
        Start::Resumed { mut state, mut fds } => {
            if FAULT == Some("ignore-a-failed-take") {
                // A take of the wrong type whose error the build ignores:
                // before `ready`, the take itself rolls back.
                let _ = fds.take_udp_socket(LISTENER);
            }
            // After a crash, a socket unit's listener comes back as such.
            let listener = match fds.take_tcp_listener(LISTENER)? {
                Some(l) => l,
                None => co
                    .take_activated_tcp_listener(None)?
                    .ok_or("the previous image handed over no listener")?,
            };
            let mut streams = HashMap::with_capacity(state.conns.len());
            let mut newer = Vec::new();
            for (id, s) in fds.take_tcp_streams(CONN)? {
                match state.conns.get(&id) {
                    // Registered for EPOLLOUT in the kept epoll instance
                    // exactly when output was pending (see `serve`).
                    Some(c) => {
                        streams.insert(id, (s, !c.out.is_empty()));
                    }
                    None => newer.push((id, s)),
                }
            }
            // TLS connections come with their sessions (`resume_tls`).
            let tls_streams = fds.take_tcp_streams(tls::CONN)?;
            let tls_ids: BTreeSet<u64> = tls_streams.iter().map(|(id, _)| *id).collect();
            let lost: Vec<u64> = state
                .conns
                .keys()
                .filter(|id| !streams.contains_key(id) && !tls_ids.contains(id))
                .copied()
                .collect();
            for id in lost {
                tracing::warn!(
                    conn = id,
                    "connection missing from the handoff; dropping its record"
                );
                state.conns.remove(&id);
            }
            // After a crash: connections newer than the last checkpoint.
            for (id, s) in newer {
                tracing::info!(
                    conn = id,
                    "a connection newer than the checkpoint: greeting it again"
                );
                state.connect_as(id, "The server restarted.\r\n");
                streams.insert(id, (s, false));
            }
            // Its registrations name descriptors by number: unless every
            // one kept its number (a migration may not manage), a new one
            // registers ours.
            let epoll = fds
                .take_fd(EPOLL)?
                .filter(|_| co.fds_kept_numbers())
                .map(Epoll);
            (state, listener, streams, epoll, Some((fds, tls_streams)))
        }
    };
    let mut chat = chat;
    let tls = match (&args.tls, fds.as_mut()) {
        (None, Some((fds, tls_streams)))
            if !tls_streams.is_empty()
                || fds
                    .names()
                    .any(|n| n == tls::SESSIONS || n == tls::LISTENER) =>
        {
            // Every TLS client would be lost: roll back instead.
            return Err("the previous image served TLS clients; start this build with --tls-listen, --tls-cert and --tls-key".into());
        }
        (None, _) => None,
        (Some(t), fds) => Some(resume_tls(&mut co, t, fds, &mut chat, &mut streams)?),
    };
    let mut tls = tls;
    if let Some(fault) = FAULT
        && fds.is_some()
    {
        inject_fault(fault, tls.as_mut(), &mut streams)?;
    }
    let kept = epoll.is_some();
    let epoll = match epoll {
        Some(e) => e,
        None => Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
    };
    let mut server = Server {
        co,
        epoll,
        listener,
        streams,
        tls,
        chat,
        args,
        accepting: true,
        online_sent: None,
        online_mark: None,
        unregistered: Vec::new(),
        late_tries: 0,
    };
    if let Err(e) = server.register(kept) {
        // Roll back while every adopted socket is still open (a no-op on a
        // fresh start, where the error is simply returned).
        return Err(server
            .co
            .rollback(&format!("registering the sockets failed: {e}"))
            .into());
    }
    if let Err(e) = server.co.ready() {
        // The image serves (the upgrade is complete); only the next upgrade
        // is impossible, and the runtime refuses it with a reason.
        tracing::warn!("{e}; serving on, later upgrades will be refused");
    }
    // The new process of a gradual migration: lines said here go to the
    // old process's users too.
    if server.co.sharing_with().is_some() {
        server.chat.relay = Some(Vec::new());
    }
    // A first checkpoint at once: a crash before any event finds one.
    if let Err(e) = server.co.checkpoint(&server.chat) {
        tracing::warn!("checkpoint failed: {e}");
    }
    // Only a log line: never a reason to stop serving.
    let addr = server
        .listener
        .local_addr()
        .map_or_else(|e| format!("unknown ({e})"), |a| a.to_string());
    match &server.tls {
        Some(tls) => {
            let tls_addr = tls
                .listener
                .local_addr()
                .map_or_else(|e| format!("unknown ({e})"), |a| a.to_string());
            tracing::info!(addr = %addr, tls_addr = %tls_addr, clients = server.streams.len(), "listening");
        }
        None => tracing::info!(addr = %addr, clients = server.streams.len(), "listening"),
    }
    // Output that was pending at the upgrade goes out now.
    let mut pending: BTreeSet<u64> = server
        .chat
        .conns
        .iter()
        .filter(|(_, c)| !c.out.is_empty())
        .map(|(id, _)| *id)
        .collect();
    // Restored TLS connections: what crossed (a hello to answer, queued
    // output, sealed records) moves now, not at their next socket event.
    pending.extend(server.process_tls(copyover::tls::Connection::awaits_processing));
    server.flush(pending);
    server.serve()
}

/// The TLS side: a new listener on a fresh start, or the previous image's
/// listener, connections and sessions.
fn resume_tls(
    co: &mut Copyover<Chat>,
    args: &TlsArgs,
    fds: Option<&mut (copyover::Inherited, Vec<(u64, TcpStream)>)>,
    chat: &mut Chat,
    streams: &mut HashMap<u64, (TcpStream, bool)>,
) -> Result<tls::Tls, BoxError> {
    let config = copyover::tls::Config::from_pem_files(&args.cert, &args.key)?;
    let bind = || -> Result<TcpListener, BoxError> {
        let l = TcpListener::bind(args.listen)
            .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
        co.store_fd(tls::LISTENER, l.as_fd())?;
        Ok(l)
    };
    let Some((fds, tls_streams)) = fds else {
        return tls::Tls::resume(config, bind()?, &mut Default::default(), &[]);
    };
    let listener = match fds.take_tcp_listener(tls::LISTENER)? {
        Some(l) => l,
        None => bind()?,
    };
    let mut carried = copyover::tls::Carried::take(fds, tls::SESSIONS)?;
    let mut ids = Vec::new();
    for (id, s) in std::mem::take(tls_streams) {
        if chat.conns.contains_key(&id) {
            ids.push(id);
            streams.insert(id, (s, false));
        } else {
            tracing::warn!(conn = id, "a TLS connection without a record; closing it");
        }
    }
    let tls = tls::Tls::resume(config, listener, &mut carried, &ids)?;
    // Registered for EPOLLOUT in the kept epoll instance exactly when
    // ciphertext was pending (`wants_write` says no until `ready`).
    for (id, conn) in &tls.conns {
        if let Some(entry) = streams.get_mut(id) {
            entry.1 = conn.has_unsent();
        }
    }
    Ok(tls)
}

/// The `hang-before-main` fault: a constructor (what a library's, a static
/// initializer or an operator's `LD_PRELOAD` runs before `main`) that never
/// returns when this build is started by an upgrade, and behaves outside
/// one, so that the probe approves the build. Only the holder's deadline
/// can end it: the image never reaches `boot`.
extern "C" fn hang_before_main() {
    let upgraded = std::env::var_os("COPYOVER_HANDOFF").is_some()
        || std::env::var_os("COPYOVER_MIGRATE").is_some();
    let probed = std::env::var_os("COPYOVER_PROBE").is_some();
    if FAULT == Some("hang-before-main") && upgraded && !probed {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// Runs [`hang_before_main`] before `main`, as the dynamic loader runs a
/// library's constructors.
#[used]
#[unsafe(link_section = ".init_array")]
static HANG_BEFORE_MAIN: extern "C" fn() = hang_before_main;

/// The bad releases of `COPYOVER_DEMO_FAULT`, for tests and demonstrations.
/// `thread-before-boot` acts in `main`, before `boot`.
fn inject_fault(
    fault: &str,
    tls: Option<&mut tls::Tls>,
    streams: &mut HashMap<u64, (TcpStream, bool)>,
) -> Result<(), BoxError> {
    tracing::warn!(fault, "this is a fault build");
    match fault {
        "write-tls-then-panic" => {
            // Writes to every TLS client before `ready`, then fails: the
            // restored sessions seal nothing before `ready`, so the old
            // image finds every peer at the sequence numbers it saved.
            for (id, conn) in tls.into_iter().flat_map(|t| t.conns.iter_mut()) {
                let _ = conn.write(b"fault build: written before ready\r\n");
                if let Some((stream, _)) = streams.get_mut(id) {
                    let _ = conn.write_tls(stream);
                }
            }
            panic!("fault build: panic after writing to the TLS clients")
        }
        // Every descriptor is claimed (and owned by locals that the error
        // drops, closing them) when `main` returns the error.
        "error-after-adopt" => Err("fault build: an error after adopting every descriptor".into()),
        "panic-after-adopt" => panic!("fault build: panic after adopting the sockets"),
        "abort-after-adopt" => std::process::abort(),
        "abort-on-two-threads" => {
            // Threads crash at once: each crash handler after the first
            // finds that one's rollback under way and must wait for its
            // exec, not end the process.
            // Three more threads than the main one: one of them is all but
            // sure to crash while another's rollback is under way.
            let all = std::sync::Arc::new(std::sync::Barrier::new(4));
            for _ in 0..3 {
                let all = std::sync::Arc::clone(&all);
                std::thread::spawn(move || {
                    all.wait();
                    std::process::abort()
                });
            }
            all.wait();
            std::process::abort()
        }
        "hang-after-adopt" => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        "exit-before-ready" => std::process::exit(3),
        "slow-ready" => {
            // A slow start-up: the window in which the old process has
            // handed over and this one is not ready yet.
            tracing::warn!("fault build: sleeping 2 s before ready");
            std::thread::sleep(Duration::from_secs(2));
            Ok(())
        }
        "panic-with-a-long-message" => panic!("fault build: {}", "x".repeat(1000)),
        "pending-alarm-then-panic" => {
            // SIGALRM pending and blocked across the rollback's exec, as
            // when the deadline fires while the rollback runs.
            use nix::sys::signal::{SigSet, SigmaskHow, Signal, raise, sigprocmask};
            let alarm = SigSet::from(Signal::SIGALRM);
            sigprocmask(SigmaskHow::SIG_BLOCK, Some(&alarm), None)?;
            raise(Signal::SIGALRM)?;
            panic!("fault build: panic with SIGALRM pending")
        }
        "zombie-then-panic" => {
            // A child that exits unreaped: the old image inherits it.
            let child = std::process::Command::new("/bin/true").spawn()?;
            let status = format!("/proc/{}/stat", child.id());
            while !std::fs::read_to_string(&status).is_ok_and(|s| s.contains(") Z ")) {
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!("fault build: panic with a zombie child")
        }
        _ => Ok(()),
    }
}

impl Server {
    /// Registers the runtime's event fd (new in every image) with epoll,
    /// and, unless the epoll instance was kept across the exec with its
    /// registrations, the listener and every connection.
    fn register(&self, kept: bool) -> Result<(), BoxError> {
        let ev = |token| EpollEvent::new(EpollFlags::EPOLLIN, token);
        self.epoll.add(self.co.event_fd(), ev(TOKEN_EVENTS))?;
        if let Some(tls) = &self.tls {
            tls.listener.set_nonblocking(true)?;
            // Already there if the kept epoll instance had it (an image
            // that served TLS before).
            match self.epoll.add(&tls.listener, ev(TOKEN_TLS_LISTENER)) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if kept {
            return Ok(());
        }
        self.listener.set_nonblocking(true)?;
        self.epoll.add(&self.listener, ev(TOKEN_LISTENER))?;
        for (id, (s, _)) in &self.streams {
            self.epoll.add(s, ev(*id))?;
        }
        Ok(())
    }

    fn version_line(&self) -> String {
        format!(
            "{APP} {LABEL} pid={} generation={}",
            std::process::id(),
            self.co.generation()
        )
    }

    fn serve(&mut self) -> Result<(), BoxError> {
        let mut events = vec![EpollEvent::empty(); 1024];
        let mut buf = vec![0u8; 64 * 1024];
        // Consecutive failures of epoll_wait: one is survived (a stray
        // error must not drop every client), a hundred in a row (a second)
        // are a broken loop.
        let mut failures = 0;
        loop {
            // An approved upgrade waiting for TLS handshakes looks again
            // every 10 ms.
            let waiting = self.tls.as_ref().is_some_and(|t| t.commit_by.is_some());
            let late = !self.unregistered.is_empty() && self.register_late();
            let timeout = if waiting || late {
                EpollTimeout::from(10u16)
            } else {
                EpollTimeout::NONE
            };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => {
                    failures = 0;
                    n
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) if failures < 100 => {
                    failures += 1;
                    tracing::warn!("waiting for events failed ({e}); trying again");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => return Err(format!("waiting for events failed 100 times: {e}").into()),
            };
            let mut dirty = BTreeSet::new();
            let mut runtime_events = false;
            let mut changed = false;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_LISTENER => {
                        changed = true;
                        self.accept(&mut dirty);
                    }
                    TOKEN_TLS_LISTENER => {
                        changed = true;
                        self.accept_tls(&mut dirty);
                    }
                    TOKEN_EVENTS => runtime_events = true,
                    id => {
                        if ev.events().intersects(
                            EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR,
                        ) {
                            changed = true;
                            self.read(id, &mut buf, &mut dirty);
                        }
                        if ev.events().contains(EpollFlags::EPOLLOUT) {
                            dirty.insert(id);
                        }
                    }
                }
            }
            self.flush(dirty);
            // During a gradual migration: lines said here, and who is
            // online, for the other process.
            self.relay();
            // After the flush, so that output already written is not in it.
            if changed && let Err(e) = self.co.checkpoint(&self.chat) {
                tracing::warn!("checkpoint failed (the previous one stays): {e}");
            }
            // After the flush: at an upgrade, every connection's EPOLLOUT
            // registration matches its pending output, which the kept epoll
            // instance and the state carry across the exec.
            if runtime_events && self.copyover_events()? {
                return Ok(());
            }
            if waiting {
                self.commit();
            }
        }
    }

    /// Handles the runtime's events; returns true to stop.
    fn copyover_events(&mut self) -> Result<bool, BoxError> {
        while let Some(event) = self.co.poll() {
            match event {
                Event::Upgrade => {
                    let keep = handoff(
                        &self.listener,
                        &self.epoll,
                        &self.streams,
                        self.tls.as_ref(),
                    );
                    // Starts the probe and returns; a refusal is logged by
                    // the runtime and we keep serving.
                    let _ = self.co.upgrade(&self.chat, &keep);
                }
                // Commits (never returns on success), or waits for TLS
                // handshakes under way to end (see `tls`).
                Event::UpgradeApproved => {
                    self.commit();
                }
                // A gradual migration (`copyover migrate --batch`).
                Event::ShareApproved => self.share(),
                Event::MoveUsers { most } => self.move_users(most),
                Event::UsersArrived => self.take_users(),
                Event::Forwarded(m) => self.forwarded(&m),
                Event::MigrationEnded => self.migration_ended(),
                Event::SaveSnapshot => {
                    if let Err(e) = self.co.save_snapshot(&self.chat, &self.args.snapshot_file) {
                        tracing::error!("could not save the snapshot: {e}");
                    }
                }
                Event::Shutdown => {
                    tracing::info!(clients = self.streams.len(), "shutting down");
                    for (s, _) in self.streams.values_mut() {
                        let _ = s.write(b"\r\nThe server is shutting down. Goodbye.\r\n");
                    }
                    return Ok(true);
                }
                _ => {}
            }
        }
        Ok(false)
    }

    fn accept(&mut self, dirty: &mut BTreeSet<u64>) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!("dropping a new connection: {e}");
                        continue;
                    }
                    let id = self.chat.connect(LABEL);
                    if let Err(e) = self.co.store_fd(&format!("conn:{id}"), stream.as_fd()) {
                        tracing::warn!(conn = id, "this connection would not survive a crash: {e}");
                    }
                    if let Err(e) = self
                        .epoll
                        .add(&stream, EpollEvent::new(EpollFlags::EPOLLIN, id))
                    {
                        tracing::warn!("dropping a new connection: {e}");
                        self.chat.conns.remove(&id);
                        continue;
                    }
                    self.streams.insert(id, (stream, false));
                    dirty.insert(id);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: log, and let the next event retry.
                    tracing::warn!("accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn read(&mut self, id: u64, buf: &mut [u8], dirty: &mut BTreeSet<u64>) {
        let version = self.version_line();
        if self.tls.as_ref().is_some_and(|t| t.conns.contains_key(&id)) {
            let mut plain = Vec::new();
            let open = self.read_tls(id, &mut plain);
            // The handshake may have something to send, a key update too.
            dirty.insert(id);
            if !plain.is_empty() {
                self.chat.input(id, &plain, &version, dirty);
            }
            if !open {
                self.close(id);
            }
            return;
        }
        let Some((stream, _)) = self.streams.get_mut(&id) else {
            return;
        };
        let mut closed = false;
        for _ in 0..16 {
            match stream.read(buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => self.chat.input(id, &buf[..n], &version, dirty),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        if closed {
            self.close(id);
        }
    }

    fn close(&mut self, id: u64) {
        self.relay_departure(id);
        if let Some(tls) = self.tls.as_mut() {
            tls.conns.remove(&id);
        }
        if let Some((s, _)) = self.streams.remove(&id) {
            let _ = self.epoll.delete(&s);
            // systemd's copy in the fd store would keep it open: shut it
            // down, and take it out of the store.
            let _ = s.shutdown(std::net::Shutdown::Both);
            self.co.unstore_fd(&format!("conn:{id}"));
        }
        self.chat.conns.remove(&id);
    }

    /// Writes what each dirty connection has pending; asks for EPOLLOUT
    /// where the socket is full, closes those that said `/quit`.
    fn flush(&mut self, dirty: BTreeSet<u64>) {
        for id in dirty {
            let is_tls = self.tls.as_ref().is_some_and(|t| t.conns.contains_key(&id));
            let Some(conn) = self.chat.conns.get_mut(&id) else {
                continue;
            };
            let closing = conn.closing;
            let need_out = if is_tls {
                let mut out = std::mem::take(&mut conn.out);
                self.flush_tls(id, &mut out, closing)
            } else {
                let Some((stream, _)) = self.streams.get_mut(&id) else {
                    continue;
                };
                write_plain(stream, &mut conn.out)
            };
            match need_out {
                Some(need_out) if !closing || need_out => self.want_out(id, need_out),
                // Failed, or said `/quit` and everything is written.
                _ => self.close(id),
            }
        }
    }

    /// Registers connection `id` for EPOLLOUT exactly while it has output
    /// pending.
    fn want_out(&mut self, id: u64, need_out: bool) {
        let Some((stream, want_out)) = self.streams.get_mut(&id) else {
            return;
        };
        if need_out != *want_out {
            let flags = if need_out {
                EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT
            } else {
                EpollFlags::EPOLLIN
            };
            let _ = self
                .epoll
                .modify(stream.as_fd(), &mut EpollEvent::new(flags, id));
            *want_out = need_out;
        }
    }
}

/// Writes what `out` holds to a plain connection: whether some is still
/// pending, or `None` if the connection failed.
fn write_plain(stream: &mut TcpStream, out: &mut Vec<u8>) -> Option<bool> {
    while !out.is_empty() {
        match stream.write(out) {
            Ok(n) => {
                out.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(!out.is_empty())
}
