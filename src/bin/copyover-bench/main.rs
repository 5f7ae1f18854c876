//! copyover-bench: measures the blackout of an in-place upgrade against its
//! physical floor and against a naive stop-and-start, in one run.
//!
//! `copyover-bench run` starts the bench server (`copyover-bench serve`, a
//! line echo whose state size is set by flags), connects the clients, and
//! upgrades it over and over while one client pings back to back, timing
//! each reply. See `copyover-bench --help` (and `copyover-bench COMMAND
//! --help`) and `scripts/bench`.

mod floor;
mod harness;
mod report;
mod server;
mod soak;
mod tls;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use copyover::status::Outcome;
use nix::sys::signal::Signal;

pub use harness::Server;
use harness::field;
use report::{Row, print_row, print_table, to_csv};

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
    /// Times copyover::tls's record layer beside rustls's own, sealing and
    /// opening the same messages in memory (prints a table).
    TlsRecords(tls::TlsArgs),
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
        BenchCommand::TlsRecords(args) => tls::tls_records(args),
        BenchCommand::ExecFloor => floor::exec_floor(),
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

/// Starts the bench server (this binary's `serve`) with a point's state.
fn start_server(point: &Point, listen: &str) -> Result<Server, BoxError> {
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
    let exec_floor_ms = floor::measure_exec_floor()?;
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
    let mut server = start_server(p, "127.0.0.1:0")?;
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
        let seq = server.seq();
        let from = Instant::now();
        server.signal(Signal::SIGHUP)?;
        let outcome = server.wait_outcome(seq, Duration::from_secs(300))?.outcome;
        let to = Instant::now();
        let Outcome::Complete {
            blackout_ms: blackout,
            phases,
            ..
        } = outcome
        else {
            return Err(format!(
                "the upgrade did not complete: {outcome}: {}",
                outcome.reason().unwrap_or("")
            )
            .into());
        };
        // Let the pinger get a few replies from the new image.
        let settle = Instant::now() + Duration::from_secs(5);
        while pinger.count_after(to) < 3 && Instant::now() < settle {
            std::thread::sleep(Duration::from_micros(200));
        }
        let lines = server.lines_since(mark);
        // A figure the runtime did not report is an error, never a zero.
        let f = |marker: &str, key: &str| {
            field(&lines, marker, key)
                .ok_or_else(|| format!("no {key}= in the server's '{marker}' line"))
        };
        let known = |v: Option<f64>, key: &str| {
            v.ok_or_else(|| format!("the status file has no {key} for this upgrade"))
        };
        let snapshot = f("snapshot sealed", "encode_ms")?;
        let (exec, restore, adopt) = (
            known(phases.exec_ms, "exec_ms")?,
            known(phases.restore_ms, "restore_ms")?,
            known(phases.adopt_ms, "adopt_ms")?,
        );
        let probe = f("accepted the snapshot", "probe_ms")?;
        let total = known(phases.total_ms, "total_ms")?;
        row.state_bytes = f("snapshot sealed", "bytes")?;
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

    row.floor_fd = floor::fd_floor(&idle)?;
    row.floor_memfd = floor::memfd_floor(row.state_bytes as usize)?;

    // The naive alternative: stop the server and start it again.
    let t = Instant::now();
    server.signal(Signal::SIGTERM)?;
    let _ = server.child.wait();
    let restarted = start_server(p, &addr.to_string())?;
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
    // The idle clients that lost their connection, each one asked.
    row.naive_lost = idle.iter_mut().filter_map(|s| ping(s).err()).count();
    drop(restarted);
    Ok(row)
}
