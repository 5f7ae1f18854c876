//! The soak: clients of the telnet demo chat at a steady rate with sequence
//! numbers while the server is upgraded back to back between two builds.
//! Every receiver must see every other sender's messages exactly once, in
//! order; nobody may be disconnected; fds, RSS and children must not grow.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use copyover::status::Outcome;

use crate::{BoxError, Server};

/// `copyover-bench soak`'s options.
#[derive(clap::Args)]
pub struct SoakArgs {
    /// Chat clients.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub clients: usize,
    /// Upgrades, alternating between the two builds.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub upgrades: usize,
    /// Messages per second, all clients together.
    #[arg(long, value_name = "MSGS_PER_SEC", default_value_t = 50.0)]
    pub rate: f64,
    /// Stop upgrading after this long.
    #[arg(long, value_name = "S", default_value_t = 300)]
    pub max_seconds: u64,
    /// The build of copyover-telnetd started first.
    pub build_a: PathBuf,
    /// The build it is upgraded to, and back from.
    pub build_b: PathBuf,
}

impl SoakArgs {
    fn builds(&self) -> [&Path; 2] {
        [&self.build_a, &self.build_b]
    }
}

struct Health {
    fds: usize,
    rss_kib: u64,
    children: usize,
}

fn health(pid: u32) -> Result<Health, BoxError> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| s.split_whitespace().count())
        .unwrap_or(0);
    Ok(Health {
        fds,
        rss_kib,
        children,
    })
}

/// One chat client: its socket, what it has not parsed yet, and the last
/// sequence number it saw from each sender.
struct Client {
    stream: TcpStream,
    inbuf: Vec<u8>,
    outbuf: VecDeque<u8>,
    last_seen: Vec<u32>,
    sent: u32,
}

pub fn soak(args: SoakArgs) -> Result<(), BoxError> {
    if args.clients < 2 || args.rate <= 0.0 {
        return Err("soak needs at least 2 clients and a positive --rate".into());
    }
    crate::server::raise_nofile_limit();
    let dir = std::env::temp_dir().join(format!("copyover-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let binary = dir.join("copyover-telnetd");
    deploy(args.builds()[0], &binary)?;
    let mut cmd = Command::new(&binary);
    cmd.args(["--listen", "127.0.0.1:0"]);
    let server = Server::spawn(cmd, "info")?;
    let pid = server.child.id();
    let addr = server.addr;

    // Log everyone in (blocking, with a timeout), then go non-blocking.
    let mut clients = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(format!("c{i}\r\n").as_bytes())?;
        let mut got = Vec::new();
        let want = format!("welcome, c{i}\r\n");
        let mut b = [0u8; 1024];
        while !String::from_utf8_lossy(&got).contains(&want) {
            let n = s.read(&mut b)?;
            if n == 0 {
                return Err(format!("client c{i} was disconnected while logging in").into());
            }
            got.extend_from_slice(&b[..n]);
        }
        s.set_nonblocking(true)?;
        clients.push(Client {
            stream: s,
            inbuf: Vec::new(),
            outbuf: VecDeque::new(),
            last_seen: vec![0; args.clients],
            sent: 0,
        });
    }
    let mut outcomes = Vec::new();
    let mut blackouts = Vec::new();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(args.max_seconds);
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    for (i, c) in clients.iter().enumerate() {
        epoll.add(&c.stream, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
    }
    let mut errors = Vec::new();
    let mut disconnected = 0;
    let mut pump = |clients: &mut Vec<Client>,
                    until: Instant,
                    send: bool,
                    next_send: &mut Instant,
                    sender: &mut usize|
     -> Result<(), BoxError> {
        let interval = Duration::from_secs_f64(1.0 / args.rate);
        let mut events = vec![EpollEvent::empty(); 256];
        loop {
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            while send && *next_send <= now {
                let c = &mut clients[*sender];
                c.sent += 1;
                c.outbuf
                    .extend(format!("m {} {}\r\n", *sender, c.sent).bytes());
                flush(c);
                *sender = (*sender + 1) % clients.len();
                *next_send += interval;
            }
            let wait_ms = (until
                .min(*next_send)
                .saturating_duration_since(now)
                .as_millis() as u16)
                .max(1);
            let n = match epoll.wait(&mut events, EpollTimeout::from(wait_ms)) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => return Err(e.into()),
            };
            for ev in &events[..n] {
                let i = ev.data() as usize;
                let c = &mut clients[i];
                let mut b = [0u8; 16 * 1024];
                loop {
                    match c.stream.read(&mut b) {
                        Ok(0) => {
                            disconnected += 1;
                            let _ = epoll.delete(&c.stream);
                            break;
                        }
                        Ok(n) => c.inbuf.extend_from_slice(&b[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => {
                            disconnected += 1;
                            let _ = epoll.delete(&c.stream);
                            break;
                        }
                    }
                }
                check_lines(i, c, &mut errors);
                flush(c);
            }
        }
    };

    let mut next_send = Instant::now();
    let mut sender = 0;
    let warmup = Instant::now() + Duration::from_millis(500);
    pump(&mut clients, warmup, true, &mut next_send, &mut sender)?;
    let mut upgrades_done = 0;
    let mut before = None;
    for n in 0..=args.upgrades {
        if Instant::now() > deadline {
            break;
        }
        let seq = server.seq();
        deploy(args.builds()[(n + 1) % 2], &binary)?;
        kill(Pid::from_raw(pid as i32), Signal::SIGHUP)?;
        // Keep chatting while waiting for the outcome.
        let status = loop {
            pump(
                &mut clients,
                Instant::now() + Duration::from_millis(2),
                true,
                &mut next_send,
                &mut sender,
            )?;
            if let Some(s) = server.outcome_since(seq) {
                break s;
            }
            if Instant::now() > deadline + Duration::from_secs(30) {
                return Err("no upgrade outcome within the time limit".into());
            }
        };
        match status.outcome {
            Outcome::Complete { blackout_ms, .. } => blackouts.push(blackout_ms),
            other => outcomes.push(format!("{other}: {}", other.reason().unwrap_or(""))),
        }
        if n == 0 {
            // The baseline is taken after a first upgrade, which closes
            // whatever the launcher leaked into the server.
            before = Some(health(pid)?);
        } else {
            upgrades_done += 1;
        }
    }
    // Stop sending, let every message arrive.
    pump(
        &mut clients,
        Instant::now() + Duration::from_secs(2),
        false,
        &mut next_send,
        &mut sender,
    )?;
    let after = health(pid)?;
    let before = before.ok_or("no upgrade happened")?;

    // Every receiver must have every other sender's last message.
    let mut lost = 0u64;
    for (r, c) in clients.iter().enumerate() {
        for (s, sender) in clients.iter().enumerate() {
            if s != r && c.last_seen[s] < sender.sent {
                lost += u64::from(sender.sent - c.last_seen[s]);
            }
        }
    }
    let sent: u64 = clients.iter().map(|c| u64::from(c.sent)).sum();
    blackouts.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        blackouts
            .get(((blackouts.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    println!(
        "soak: {} clients, {upgrades_done} upgrades in {:.1} s, {sent} messages sent ({} deliveries expected)",
        args.clients,
        t0.elapsed().as_secs_f64(),
        sent * (args.clients as u64 - 1)
    );
    println!(
        "  lost: {lost}, duplicated or reordered: {}, clients disconnected: {disconnected}",
        errors.len()
    );
    println!(
        "  server fds: {} -> {}, RSS: {} -> {} KiB, children: {} -> {}",
        before.fds, after.fds, before.rss_kib, after.rss_kib, before.children, after.children
    );
    println!(
        "  blackout ms: p50 {:.2}, p90 {:.2}, p99 {:.2}, max {:.2}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    for e in errors.iter().take(5) {
        println!("  error: {e}");
    }
    for o in outcomes.iter().take(5) {
        println!("  not complete: {o}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ok = lost == 0
        && errors.is_empty()
        && disconnected == 0
        && outcomes.is_empty()
        && after.fds <= before.fds
        && after.children <= before.children
        && after.rss_kib <= before.rss_kib * 2 + 4096
        && upgrades_done > 0;
    if ok {
        println!("soak: PASS");
        Ok(())
    } else {
        Err("soak: FAIL (see above)".into())
    }
}

/// Parses complete lines; checks `NAME: m SENDER SEQ` sequence numbers.
fn check_lines(receiver: usize, c: &mut Client, errors: &mut Vec<String>) {
    while let Some(pos) = c.inbuf.windows(2).position(|w| w == b"\r\n") {
        let line: Vec<u8> = c.inbuf.drain(..pos + 2).take(pos).collect();
        let line = String::from_utf8_lossy(&line);
        let Some((_, msg)) = line.split_once(": m ") else {
            continue;
        };
        let mut parts = msg.split_whitespace();
        let (Some(Ok(s)), Some(Ok(seq))) = (
            parts.next().map(str::parse::<usize>),
            parts.next().map(str::parse::<u32>),
        ) else {
            errors.push(format!("c{receiver} got a malformed line {line:?}"));
            continue;
        };
        let Some(last) = c.last_seen.get_mut(s) else {
            continue;
        };
        if seq != *last + 1 {
            errors.push(format!("c{receiver} got c{s}'s message {seq} after {last}"));
        }
        *last = seq;
    }
}

fn flush(c: &mut Client) {
    while !c.outbuf.is_empty() {
        let (a, _) = c.outbuf.as_slices();
        match c.stream.write(a) {
            Ok(n) => {
                c.outbuf.drain(..n);
            }
            Err(_) => return,
        }
    }
}

fn deploy(build: &Path, binary: &Path) -> Result<(), BoxError> {
    let tmp = binary.with_extension("new");
    std::fs::copy(build, &tmp)?;
    std::fs::rename(&tmp, binary)?;
    Ok(())
}
