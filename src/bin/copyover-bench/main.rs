//! copyover-bench: measures the blackout of an in-place upgrade against its
//! physical floor and against a naive stop-and-start, in one run.
//!
//! `copyover-bench run` starts the bench server (`copyover-bench serve`, a
//! line echo whose state size is set by flags), connects the clients, and
//! upgrades it over and over while one client pings back to back, timing
//! each reply. See `copyover-bench --help` (and `copyover-bench COMMAND
//! --help`) and `scripts/bench`.

mod server;
mod soak;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// copyover-bench: blackout of copyover upgrades against the floor and a
/// naive restart
#[derive(Parser)]
#[command(name = "copyover-bench")]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Measures every point and writes DIR/results.csv.
    ///
    /// The points: 1, 1,000 and 10,000 clients with a small state; 10 MiB,
    /// 100 MiB and 1 GiB of bulk state; 100 MiB of small records; 1 GiB in a
    /// copyover::Region. Prints a table.
    Run(RunArgs),
    /// Chats with N clients of copyover-telnetd while the server is
    /// upgraded back and forth between BUILD_A and BUILD_B.
    ///
    /// The clients send sequence numbers (--rate messages per second in
    /// all). Fails unless nothing is lost, duplicated or reordered, nobody
    /// is disconnected, and fds, RSS and children do not grow.
    Soak(soak::SoakArgs),
    /// The bench server: answers every line with `pong`; upgraded by SIGHUP.
    Serve(server::ServeArgs),
    /// Executes itself COPYOVER_BENCH_EXECS times and prints the total
    /// nanoseconds (what `run` calls the exec floor).
    #[command(hide = true)]
    ExecFloor,
}

/// `copyover-bench run`'s options.
#[derive(Args)]
struct RunArgs {
    /// Two small points, at most 3 upgrades each (a smoke run).
    #[arg(long)]
    quick: bool,
    /// Upgrades per point.
    #[arg(long, value_name = "N", default_value_t = 10)]
    upgrades: usize,
    /// Only the points whose name contains TEXT.
    #[arg(long, value_name = "TEXT")]
    only: Option<String>,
    /// Where results.csv goes.
    #[arg(long, value_name = "DIR", default_value = "bench")]
    out: PathBuf,
}

pub type BoxError = Box<dyn std::error::Error>;

fn main() {
    // Bad usage exits with 2, help with 0 (clap's own).
    let result = match Cli::parse().command {
        BenchCommand::Serve(args) => {
            init_log();
            server::serve(args)
        }
        BenchCommand::Run(args) => run(args),
        BenchCommand::Soak(args) => soak::soak(args),
        BenchCommand::ExecFloor => exec_floor(),
    };
    if let Err(e) = result {
        eprintln!("copyover-bench: {e}");
        std::process::exit(2);
    }
}

/// The bench server's log, on stderr (where `run` reads it).
fn init_log() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,copyover=debug")),
        )
        .init();
}

/// One measured configuration.
struct Point {
    name: &'static str,
    clients: usize,
    bulk: usize,
    records: usize,
    region: usize,
}

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

fn points(quick: bool) -> Vec<Point> {
    let p = |name, clients, bulk, records| Point {
        name,
        clients,
        bulk,
        records,
        region: 0,
    };
    if quick {
        return vec![
            p("1 client, 1 KiB", 1, KIB, 0),
            p("1000 clients, 10 MiB", 1000, 10 * MIB, 0),
        ];
    }
    vec![
        p("1 client, 1 KiB", 1, KIB, 0),
        p("1000 clients, 1 KiB", 1000, KIB, 0),
        p("10000 clients, 1 KiB", 10_000, KIB, 0),
        p("1 client, 10 MiB bulk", 1, 10 * MIB, 0),
        p("1 client, 100 MiB bulk", 1, 100 * MIB, 0),
        p("1 client, 1 GiB bulk", 1, 1024 * MIB, 0),
        // About 32 bytes each once encoded: ~100 MiB of small records.
        p("1 client, 100 MiB records", 1, 0, 3_300_000),
        // The moonshot: 1 GiB that crosses the exec in a copyover::Region.
        Point {
            region: 1024 * MIB,
            ..p("1 client, 1 GiB region", 1, KIB, 0)
        },
    ]
}

/// A running bench server and its log.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(point: &Point, listen: &str) -> Result<Server, BoxError> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["serve", "--listen", listen]).args([
            "--bulk",
            &point.bulk.to_string(),
            "--records",
            &point.records.to_string(),
            "--region",
            &point.region.to_string(),
        ]);
        Server::spawn(cmd, "info,copyover=debug")
    }

    /// Starts a server (the bench server or the demo), collects its log and
    /// waits until it says where it listens.
    pub fn spawn(mut cmd: Command, log_filter: &str) -> Result<Server, BoxError> {
        let mut child = cmd
            .env("RUST_LOG", log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().ok_or("no stderr")?;
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        let mut server = Server {
            child,
            addr: "127.0.0.1:1".parse()?,
            log,
        };
        let line = server.wait(0, "listening addr=", Duration::from_secs(120))?;
        let addr = line
            .split("addr=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next());
        server.addr = addr.ok_or("no address in the log")?.parse()?;
        Ok(server)
    }

    /// The first upgrade outcome logged after `mark`, if any yet.
    pub fn outcome_since(&self, mark: usize) -> Option<String> {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .skip(mark)
            .find(|l| {
                l.contains("upgrade complete")
                    || l.contains("upgrade refused")
                    || l.contains("upgrade rolled back")
            })
            .cloned()
    }

    pub fn mark(&self) -> usize {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn wait(&mut self, mark: usize, pattern: &str, limit: Duration) -> Result<String, BoxError> {
        let deadline = Instant::now() + limit;
        loop {
            let found = self
                .log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .skip(mark)
                .find(|l| {
                    l.contains(pattern)
                        || l.contains("upgrade refused")
                        || l.contains("upgrade rolled back")
                })
                .cloned();
            match found {
                Some(l) if l.contains(pattern) => return Ok(l),
                Some(l) => return Err(format!("while waiting for {pattern:?}: {l}").into()),
                None => {}
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(
                    format!("the server exited ({status}) while waiting for {pattern:?}").into(),
                );
            }
            if Instant::now() > deadline {
                return Err(format!("timed out waiting for {pattern:?}").into());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn lines_since(&self, mark: usize) -> Vec<String> {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .skip(mark)
            .cloned()
            .collect()
    }

    fn signal(&self, sig: Signal) -> Result<(), BoxError> {
        kill(Pid::from_raw(self.child.id() as i32), sig)?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `key=value` from a log line, as a number.
fn field(lines: &[String], marker: &str, key: &str) -> Option<f64> {
    let line = lines.iter().find(|l| l.contains(marker))?;
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split_whitespace().next()?.parse().ok()
}

/// Sends one line and waits for its `pong`.
fn ping(s: &mut TcpStream) -> std::io::Result<()> {
    s.write_all(b"p\n")?;
    let mut got = Vec::with_capacity(8);
    let mut b = [0u8; 64];
    while !got.ends_with(b"pong\n") {
        let n = s.read(&mut b)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&b[..n]);
    }
    Ok(())
}

/// A client pinging back to back on its own thread: (sent at, round trip).
struct Pinger {
    samples: Arc<Mutex<Vec<(Instant, Duration)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Pinger {
    fn start(mut s: TcpStream) -> Pinger {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, flag) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let t = Instant::now();
                ping(&mut s)?;
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((t, t.elapsed()));
            }
            Ok(())
        });
        Pinger {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// The longest round trip overlapping [from, to].
    fn stall(&self, from: Instant, to: Instant) -> Duration {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples
            .iter()
            .filter(|(t, rtt)| *t <= to && *t + *rtt >= from)
            .map(|(_, rtt)| *rtt)
            .max()
            .unwrap_or_default()
    }

    fn count_after(&self, t: Instant) -> usize {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(s, _)| *s > t)
            .count()
    }

    fn finish(mut self) -> Result<(), BoxError> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(format!("the pinging client lost its connection: {e}").into()),
            _ => Err("the pinging thread panicked".into()),
        }
    }
}

#[derive(Default, Clone)]
struct Row {
    name: String,
    clients: usize,
    state_bytes: f64,
    stall: Vec<f64>,
    blackout: Vec<f64>,
    total: Vec<f64>,
    phases: Vec<[f64; 6]>,
    dropped: usize,
    naive_ms: f64,
    naive_lost: usize,
    floor_exec: f64,
    floor_fd: f64,
    floor_memfd: f64,
}

/// `snapshot`: encoding the state straight into the memfd and sealing it;
/// `exec`: from then to the new image's first instruction of `boot`;
/// `other`: SIGHUP to the probe's start and back to the loop.
const PHASES: [&str; 6] = ["probe", "snapshot", "exec", "restore", "adopt", "other"];

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() { 0.0 } else { s[s.len() / 2] }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

fn run(args: RunArgs) -> Result<(), BoxError> {
    let RunArgs {
        quick,
        mut upgrades,
        only,
        out,
    } = args;
    if quick {
        upgrades = upgrades.min(3);
    }
    server::raise_nofile_limit();
    let exec_floor_ms = measure_exec_floor()?;
    eprintln!("execve floor (this binary, exec to main): {exec_floor_ms:.3} ms");
    let mut rows = Vec::new();
    for p in points(quick)
        .into_iter()
        .filter(|p| only.as_ref().is_none_or(|o| p.name.contains(o.as_str())))
    {
        eprintln!("measuring: {} ...", p.name);
        let mut row = measure(&p, upgrades)?;
        row.floor_exec = exec_floor_ms;
        print_row(&row);
        rows.push(row);
    }
    std::fs::create_dir_all(&out)?;
    let csv = out.join("results.csv");
    std::fs::write(&csv, to_csv(&rows))?;
    println!();
    print_table(&rows);
    println!("\nwritten: {}", csv.display());
    Ok(())
}

fn measure(p: &Point, upgrades: usize) -> Result<Row, BoxError> {
    let mut server = Server::start(p, "127.0.0.1:0")?;
    let addr = server.addr;
    // The idle clients, then the one that pings.
    let mut idle = Vec::with_capacity(p.clients.saturating_sub(1));
    for _ in 1..p.clients {
        idle.push(TcpStream::connect(addr)?);
    }
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        ping(s)?;
    }
    let pinger_stream = TcpStream::connect(addr)?;
    pinger_stream.set_nodelay(true)?;
    pinger_stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let pinger = Pinger::start(pinger_stream);

    let mut row = Row {
        name: p.name.into(),
        clients: p.clients,
        ..Row::default()
    };
    for _ in 0..upgrades {
        let mark = server.mark();
        let from = Instant::now();
        server.signal(Signal::SIGHUP)?;
        server.wait(mark, "upgrade complete", Duration::from_secs(300))?;
        let to = Instant::now();
        // Let the pinger get a few replies from the new image.
        let settle = Instant::now() + Duration::from_secs(5);
        while pinger.count_after(to) < 3 && Instant::now() < settle {
            std::thread::sleep(Duration::from_micros(200));
        }
        let lines = server.lines_since(mark);
        let f = |marker: &str, key: &str| field(&lines, marker, key).unwrap_or(0.0);
        let blackout = f("upgrade complete", "blackout_ms");
        let snapshot = f("snapshot sealed", "encode_ms");
        let (exec, restore, adopt) = (
            f("upgrade complete", "exec_ms"),
            f("upgrade complete", "restore_ms"),
            f("upgrade complete", "adopt_ms"),
        );
        let probe = f("accepted the snapshot", "probe_ms");
        let total = f("upgrade complete", "total_ms");
        row.state_bytes = f("snapshot sealed", "bytes");
        row.phases.push([
            probe,
            snapshot,
            exec - snapshot,
            restore,
            adopt,
            (total - probe - blackout).max(0.0),
        ]);
        row.blackout.push(blackout);
        row.total.push(total);
        row.stall.push(pinger.stall(from, to).as_secs_f64() * 1e3);
    }
    pinger.finish()?;
    // Every idle client must still be connected and answered.
    row.dropped = idle.iter_mut().filter_map(|s| ping(s).err()).count();

    row.floor_fd = fd_floor(&idle)?;
    row.floor_memfd = memfd_floor(row.state_bytes as usize)?;

    // The naive alternative: stop the server and start it again.
    let t = Instant::now();
    server.signal(Signal::SIGTERM)?;
    let _ = server.child.wait();
    let restarted = Server::start(p, &addr.to_string())?;
    let mut probe = loop {
        if let Ok(s) = TcpStream::connect(addr) {
            break s;
        }
        if t.elapsed() > Duration::from_secs(60) {
            return Err("the restarted server did not serve".into());
        }
    };
    ping(&mut probe)?;
    row.naive_ms = t.elapsed().as_secs_f64() * 1e3;
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
    }
    row.naive_lost = idle.iter_mut().filter_map(|s| ping(s).err()).count() + 1;
    drop(restarted);
    Ok(row)
}

/// What the runtime must do per kept fd, done on `fds`: clear
/// close-on-exec, check the socket (`SO_TYPE`, `SO_ACCEPTCONN`), add to a
/// fresh epoll. Milliseconds, median of three.
fn fd_floor(fds: &[TcpStream]) -> Result<f64, BoxError> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
    use nix::sys::socket::{getsockopt, sockopt};
    let mut runs = Vec::new();
    for _ in 0..3 {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let t = Instant::now();
        for s in fds {
            fcntl(s.as_fd(), FcntlArg::F_SETFD(FdFlag::empty()))?;
        }
        for s in fds {
            getsockopt(s, sockopt::SockType)?;
            getsockopt(s, sockopt::AcceptConn)?;
        }
        for s in fds {
            epoll.add(
                s,
                EpollEvent::new(EpollFlags::EPOLLIN, s.as_raw_fd() as u64),
            )?;
        }
        runs.push(t.elapsed().as_secs_f64() * 1e3);
        for s in fds {
            fcntl(s.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
        }
    }
    Ok(median(&runs))
}

/// A memfd write and a read back of `bytes`. Milliseconds, median of three.
fn memfd_floor(bytes: usize) -> Result<f64, BoxError> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    use std::os::unix::fs::FileExt;
    let data = vec![7u8; bytes];
    let mut runs = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let file = std::fs::File::from(memfd_create(c"floor", MFdFlags::MFD_CLOEXEC)?);
        file.write_all_at(&data, 0)?;
        let mut back = vec![0u8; bytes];
        file.read_exact_at(&mut back, 0)?;
        runs.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(&runs))
}

/// `execve` of this binary, from the call to its `main`: runs
/// `exec-floor`, which executes itself 200 times. Milliseconds per exec.
fn measure_exec_floor() -> Result<f64, BoxError> {
    let count = 200;
    let out = Command::new(std::env::current_exe()?)
        .arg("exec-floor")
        .env("COPYOVER_BENCH_EXECS", count.to_string())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let total_ns: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("exec-floor printed {text:?}"))?;
    Ok(total_ns / count as f64 / 1e6)
}

fn exec_floor() -> Result<(), BoxError> {
    let now = || {
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u128 * 1_000_000_000 + t.tv_nsec() as u128)
            .unwrap_or(0)
    };
    let left: u32 = std::env::var("COPYOVER_BENCH_EXECS")?.parse()?;
    let start: u128 = match std::env::var("COPYOVER_BENCH_EXEC_START") {
        Ok(s) => s.parse()?,
        Err(_) => now(),
    };
    if left == 0 {
        println!("{}", now() - start);
        return Ok(());
    }
    let exe = std::ffi::CString::new(
        std::env::current_exe()?
            .into_os_string()
            .into_encoded_bytes(),
    )?;
    let argv = [exe.clone(), c"exec-floor".into()];
    let env = [
        std::ffi::CString::new(format!("COPYOVER_BENCH_EXECS={}", left - 1))?,
        std::ffi::CString::new(format!("COPYOVER_BENCH_EXEC_START={start}"))?,
    ];
    Err(nix::unistd::execve(&exe, &argv, &env)
        .map(|_| ())
        .unwrap_err()
        .into())
}

/// A row's figures, computed once for every rendering.
struct Summary {
    stall: (f64, f64),
    blackout: (f64, f64),
    total: f64,
    floor: f64,
    ratio: f64,
    phases: [f64; PHASES.len()],
}

impl Row {
    fn summary(&self) -> Summary {
        let floor = self.floor_exec + self.floor_fd + self.floor_memfd;
        let blackout = (median(&self.blackout), max(&self.blackout));
        Summary {
            stall: (median(&self.stall), max(&self.stall)),
            blackout,
            total: median(&self.total),
            floor,
            ratio: blackout.0 / floor.max(1e-9),
            phases: std::array::from_fn(|i| {
                median(&self.phases.iter().map(|p| p[i]).collect::<Vec<_>>())
            }),
        }
    }
}

fn print_row(r: &Row) {
    let m = r.summary();
    eprintln!(
        "  stall median {:.2} ms max {:.2} | blackout median {:.2} max {:.2} | floor {:.2} ({:.1}x) | dropped {} | naive restart {:.1} ms, {} lost",
        m.stall.0,
        m.stall.1,
        m.blackout.0,
        m.blackout.1,
        m.floor,
        m.ratio,
        r.dropped,
        r.naive_ms,
        r.naive_lost
    );
}

fn print_table(rows: &[Row]) {
    println!(
        "| point | state | client stall ms (median / max) | blackout ms (median / max) | floor ms (exec + fds + memfd) | x floor | SIGHUP to serving ms | dropped | naive restart ms | naive lost |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let m = r.summary();
        println!(
            "| {} | {:.1} MiB | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} ({:.2} + {:.2} + {:.2}) | {:.2} | {:.1} | {} | {:.1} | {} |",
            r.name,
            r.state_bytes / MIB as f64,
            m.stall.0,
            m.stall.1,
            m.blackout.0,
            m.blackout.1,
            m.floor,
            r.floor_exec,
            r.floor_fd,
            r.floor_memfd,
            m.ratio,
            m.total,
            r.dropped,
            r.naive_ms,
            r.naive_lost
        );
    }
    println!("\nphases, median ms:\n");
    println!("| point | {} |", PHASES.join(" | "));
    println!("|---|{}", "---|".repeat(PHASES.len()));
    for r in rows {
        let cols: Vec<String> = r
            .summary()
            .phases
            .iter()
            .map(|p| format!("{p:.2}"))
            .collect();
        println!("| {} | {} |", r.name, cols.join(" | "));
    }
}

fn to_csv(rows: &[Row]) -> String {
    let mut s = String::from(
        "point,clients,state_bytes,stall_median_ms,stall_max_ms,blackout_median_ms,blackout_max_ms,total_median_ms,floor_ms,floor_exec_ms,floor_fd_ms,floor_memfd_ms,dropped,naive_restart_ms,naive_lost",
    );
    for p in PHASES {
        s.push_str(&format!(",{p}_median_ms"));
    }
    s.push('\n');
    for r in rows {
        let m = r.summary();
        let mut fields = vec![
            format!("\"{}\"", r.name),
            r.clients.to_string(),
            r.state_bytes.to_string(),
        ];
        let figures = [
            m.stall.0,
            m.stall.1,
            m.blackout.0,
            m.blackout.1,
            m.total,
            m.floor,
            r.floor_exec,
            r.floor_fd,
            r.floor_memfd,
        ];
        fields.extend(figures.iter().map(|f| format!("{f:.3}")));
        fields.extend([
            r.dropped.to_string(),
            format!("{:.3}", r.naive_ms),
            r.naive_lost.to_string(),
        ]);
        fields.extend(m.phases.iter().map(|p| format!("{p:.3}")));
        s.push_str(&fields.join(","));
        s.push('\n');
    }
    s
}
