//! copyover: the operator's tool for servers that upgrade in place.
//!
//! `copyover upgrade PID` sends SIGHUP and waits for the outcome,
//! `copyover migrate PID` sends SIGUSR2 (a migration to a new process) and
//! waits for the new process's outcome, `copyover status PID` shows what a process runs, `copyover inspect FILE`
//! shows a saved snapshot. It reads the status files the runtime writes
//! (see `copyover::status`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use copyover::status::{
    Outcome, Status, prepare_migration, request_gradual_migration, request_migration,
    request_move_back, request_staying_migration, request_upgrade, start_ticks, status_dir,
    status_path,
};
use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

/// Where the status files are, for every command's `--help`.
const STATUS_DIR_NOTE: &str = "\
Status files live in $COPYOVER_STATUS_DIR, else /run/copyover for root,
else $XDG_RUNTIME_DIR/copyover, else /tmp/copyover-UID; --status-dir
overrides. The server and this tool must agree on it.";

/// Exit status of `copyover upgrade`, for its `--help`.
const UPGRADE_EXIT: &str = "\
Exit status: 0 upgrade complete, 1 refused or rolled back, 2 no outcome
before the timeout, 3 PID is not an upgradable copyover process (or not
yours), 64 bad usage.";

/// Exit status of `copyover migrate`, for its `--help`.
const MIGRATE_EXIT: &str = "\
Prints the new process's PID and outcome on success.
Exit status: 0 migration complete (the new process serves, the old one
exited), 1 refused or rolled back (the old process serves on), 2 no
outcome before the timeout, 3 PID is not a copyover process (or not yours),
64 bad usage. With --back: 0 every user is back in PID, 1 another outcome.

A gradual migration (--batch N --every SECS) waits until the last batch
moved; meanwhile both processes serve. `copyover migrate PID --back`
stops it and moves everyone back to PID.";

/// Bad usage: `EX_USAGE` from sysexits.h.
const EXIT_USAGE: u8 = 64;

/// copyover: upgrade, watch and inspect servers that upgrade in place
#[derive(Parser)]
#[command(name = "copyover", after_help = STATUS_DIR_NOTE)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sends SIGHUP to PID and waits for the outcome (default 60 s).
    #[command(after_help = format!("{UPGRADE_EXIT}\n\n{STATUS_DIR_NOTE}"))]
    Upgrade {
        #[command(flatten)]
        target: TargetArgs,
        /// How long to wait for the outcome, in seconds.
        #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_timeout)]
        timeout: Duration,
    },
    /// Sends SIGUSR2 to PID: it hands its clients and state to a new
    /// process of the binary and exits; waits for the outcome (default 60 s).
    #[command(after_help = format!("{MIGRATE_EXIT}\n\n{STATUS_DIR_NOTE}"))]
    Migrate {
        #[command(flatten)]
        target: TargetArgs,
        /// How long to wait for the outcome, in seconds.
        #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_timeout)]
        timeout: Duration,
        /// A gradual migration: both processes serve, and N users move to
        /// the new one at a time (the outcome comes once the last moved).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "back")]
        batch: Option<u32>,
        /// With --batch: one batch every SECS seconds.
        #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_timeout, requires = "batch")]
        every: Duration,
        /// During a gradual migration from PID: move every user back to PID
        /// (the new process then exits).
        #[arg(long)]
        back: bool,
        /// Once it handed everything over, PID stays (serving nobody) until
        /// it is stopped (SIGTERM), instead of exiting.
        #[arg(long, conflicts_with = "back")]
        stay: bool,
        /// Send no signal: the migration starts when a process started
        /// elsewhere with COPYOVER_JOIN=DIR/PID.migration connects (PID runs
        /// with a migration socket); --batch and --stay apply to it.
        #[arg(long, conflicts_with = "back")]
        external: bool,
    },
    /// Prints the running generation, version, start time and the last
    /// outcome of PID.
    #[command(after_help = STATUS_DIR_NOTE)]
    Status {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Prints a snapshot file's header, manifest and sizes (files that
    /// `kill -USR1` writes, for staging).
    Inspect {
        /// The snapshot file.
        file: PathBuf,
    },
}

/// The process a command is about.
#[derive(Args)]
struct TargetArgs {
    /// The server's process ID.
    #[arg(value_parser = parse_pid)]
    pid: u32,
    /// The status directory the server writes to.
    #[arg(long, value_name = "DIR")]
    status_dir: Option<PathBuf>,
}

fn parse_pid(s: &str) -> Result<u32, String> {
    s.parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{s:?} is not a PID"))
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    s.parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a positive number of seconds"))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help goes to stdout with status 0; bad usage to stderr with 64.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.command {
        Command::Upgrade { target, timeout } => upgrade(&Target::new(target, timeout)),
        Command::Migrate {
            target,
            timeout,
            batch,
            every,
            back,
            stay,
            external,
        } => {
            let t = Target::new(target, timeout);
            let dir = t.dir.clone();
            if back {
                move_back(&t)
            } else if external {
                let gradual = batch.map(|b| (b as usize, every));
                migrate(&t, &move |s: &Status| {
                    prepare_migration(s, &dir, gradual, stay)
                })
            } else if let Some(batch) = batch {
                migrate(&t, &move |s: &Status| {
                    request_gradual_migration(s, &dir, batch as usize, every, stay)
                })
            } else if stay {
                migrate(&t, &move |s: &Status| request_staying_migration(s, &dir))
            } else {
                migrate(&t, &request_migration)
            }
        }
        Command::Status { target } => status(&Target::new(target, Duration::ZERO)),
        Command::Inspect { file } => inspect(&file),
    };
    match result {
        Ok(code) => code,
        Err(Failure::Target(m)) => {
            eprintln!("copyover: {m}");
            ExitCode::from(3)
        }
    }
}

/// Why a command could not act on its target (exit status 3).
enum Failure {
    Target(String),
}

struct Target {
    pid: u32,
    dir: PathBuf,
    timeout: Duration,
}

impl Target {
    fn new(args: TargetArgs, timeout: Duration) -> Target {
        Target {
            pid: args.pid,
            dir: args.status_dir.unwrap_or_else(status_dir),
            timeout,
        }
    }
}

/// Reads PID's status, explaining why there is none.
fn read_status(t: &Target) -> Result<Status, Failure> {
    match kill(Pid::from_raw(t.pid as i32), None) {
        Err(Errno::ESRCH) => return Err(Failure::Target(format!("there is no process {}", t.pid))),
        Err(Errno::EPERM) => {
            return Err(Failure::Target(format!(
                "process {} belongs to another user: run copyover as that user or as root",
                t.pid
            )));
        }
        _ => {}
    }
    let path = status_path(&t.dir, t.pid);
    match Status::read(&path) {
        Ok(s) if s.pid == t.pid => {
            // The file outlives a server killed with SIGKILL: make sure the
            // PID is still the process that wrote it, not a stranger that
            // SIGHUP (whose default action kills) would hurt.
            let actual = start_ticks(t.pid).unwrap_or(0);
            if s.start_ticks == 0 || s.start_ticks != actual {
                return Err(Failure::Target(format!(
                    "process {} is not the process that wrote {} (it started at tick {actual}, the file says {}): the server died and its PID was reused; remove the stale file",
                    t.pid,
                    path.display(),
                    s.start_ticks
                )));
            }
            Ok(s)
        }
        Ok(_) | Err(_) if !path.exists() => Err(Failure::Target(format!(
            "process {} is not a copyover process: it has no status file at {} (if it runs under another status directory, pass --status-dir)",
            t.pid,
            path.display()
        ))),
        Ok(s) => Err(Failure::Target(format!(
            "{} describes process {}, not {}",
            path.display(),
            s.pid,
            t.pid
        ))),
        Err(e) => Err(Failure::Target(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// The runtime's own sentence for the outcome (`Outcome::sentence`), with
/// what the server runs now where that is not in it.
fn describe(s: &Status) -> String {
    let sentence = s.outcome.sentence();
    match &s.outcome {
        Outcome::Complete { .. } => sentence,
        Outcome::Refused { .. } => {
            format!(
                "{sentence} (still {}, generation {})",
                s.version, s.generation
            )
        }
        Outcome::RolledBack { .. } => format!(
            "{sentence} (back on {}, generation {})",
            s.version, s.generation
        ),
        _ => format!("{sentence} {} (generation {})", s.version, s.generation),
    }
}

/// Reads PID's status, then asks it (`request`: SIGHUP or SIGUSR2, pinned
/// with a pidfd and checked again, so that the PID cannot be reused between
/// the check and the signal); returns the status from before.
fn ask(t: &Target, request: &dyn Fn(&Status) -> std::io::Result<()>) -> Result<Status, Failure> {
    let before = read_status(t)?;
    request(&before).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => Failure::Target(format!(
            "{e}; the server died and its PID was reused: remove the stale status file"
        )),
        _ => Failure::Target(format!("cannot signal process {}: {e}", t.pid)),
    })?;
    Ok(before)
}

fn upgrade(t: &Target) -> Result<ExitCode, Failure> {
    let before = ask(t, &request_upgrade)?;
    await_outcome(
        t,
        &before,
        "during the upgrade",
        "the upgrade may still be under way (see the server's log)",
        |outcome| outcome.is_complete(),
    )
}

/// Waits for PID's next outcome after `before`'s, prints it, and exits 0
/// if `success` says so, 1 otherwise; 2 if none came in time (`late`
/// says what that may mean), 3 if PID exited (`while` says when).
fn await_outcome(
    t: &Target,
    before: &Status,
    while_: &str,
    late: &str,
    success: impl Fn(&Outcome) -> bool,
) -> Result<ExitCode, Failure> {
    let deadline = Instant::now() + t.timeout;
    let path = status_path(&t.dir, t.pid);
    loop {
        if let Ok(now) = Status::read(&path)
            && now.seq > before.seq
            && now.outcome.ends_an_upgrade()
        {
            println!("{}", describe(&now));
            return Ok(ExitCode::from(u8::from(!success(&now.outcome))));
        }
        if kill(Pid::from_raw(t.pid as i32), None) == Err(Errno::ESRCH) {
            return Err(Failure::Target(format!(
                "process {} exited {while_}",
                t.pid
            )));
        }
        if Instant::now() >= deadline {
            println!("no outcome within {:?}: {late}", t.timeout);
            return Ok(ExitCode::from(2));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn migrate(
    t: &Target,
    request: &dyn Fn(&Status) -> std::io::Result<()>,
) -> Result<ExitCode, Failure> {
    let before = ask(t, request)?;
    let deadline = Instant::now() + t.timeout;
    let path = status_path(&t.dir, t.pid);
    let outcome = |path: &Path, after: u64| {
        Status::read(path)
            .ok()
            .filter(|s| s.seq > after && s.outcome.ends_an_upgrade())
    };
    // The outcome `before` had may be the one of an upgrade that was under
    // way: only a later one counts (`seq` grows with each).
    let timed_out = || {
        println!(
            "no outcome within {:?}: the migration may still be under way (see the server's log)",
            t.timeout
        );
        Ok(ExitCode::from(2))
    };
    // The old process's outcome: `migrated` names the new process.
    let to = loop {
        // Read again after the process is gone: it writes `migrated`, then
        // exits.
        let gone = kill(Pid::from_raw(t.pid as i32), None) == Err(Errno::ESRCH);
        match outcome(&path, before.seq) {
            Some(Status {
                outcome: Outcome::Migrated { to },
                ..
            }) => break to,
            // An in-place upgrade under way when SIGUSR2 came ended: the
            // migration comes after it.
            Some(other) if other.outcome.is_complete() => {}
            Some(other) => {
                println!("{}", describe(&other));
                return Ok(ExitCode::from(1));
            }
            None if gone => {
                return Err(Failure::Target(format!(
                    "process {} exited during the migration without an outcome",
                    t.pid
                )));
            }
            None => {}
        }
        if Instant::now() >= deadline {
            return timed_out();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // The new process's own outcome, in its own status file. One started
    // elsewhere may write it to another directory (another user's, say):
    // after 5 s without it, a live new process is reported as such.
    let new_path = status_path(&t.dir, to);
    let unseen_until = Instant::now() + Duration::from_secs(5);
    loop {
        let gone = kill(Pid::from_raw(to as i32), None) == Err(Errno::ESRCH);
        // Its own file, not one an earlier process of that PID left.
        let fresh = |s: &Status| s.start_ticks != 0 && start_ticks(to).ok() == Some(s.start_ticks);
        if let Some(now) = outcome(&new_path, 0).filter(fresh) {
            println!(
                "process {} migrated to process {to}: {}",
                t.pid,
                describe(&now)
            );
            return Ok(ExitCode::from(u8::from(!now.outcome.is_complete())));
        }
        if gone {
            return Err(Failure::Target(format!(
                "process {} handed over to process {to}, which exited before it reported",
                t.pid
            )));
        }
        if Instant::now() >= unseen_until && !new_path.exists() {
            println!(
                "process {} migrated to process {to}, which serves; its outcome is not in {} (it writes its status to another directory)",
                t.pid,
                t.dir.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() >= deadline {
            return timed_out();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn status(t: &Target) -> Result<ExitCode, Failure> {
    let s = read_status(t)?;
    println!("pid:          {}", s.pid);
    println!("app:          {}", s.app);
    println!("version:      {}", s.version);
    println!("generation:   {}", s.generation);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    println!(
        "started:      {} (Unix time; up {} s)",
        s.started_at,
        now.saturating_sub(s.started_at)
    );
    println!("last outcome: {}", describe(&s));
    println!("updated:      {} (Unix time)", s.updated_at);
    Ok(ExitCode::SUCCESS)
}

fn inspect(file: &Path) -> Result<ExitCode, Failure> {
    let snap = copyover::snapshot::read_file(file)
        .map_err(|e| Failure::Target(format!("{}: {e}", file.display())))?;
    let h = &snap.header;
    println!("snapshot:       {}", file.display());
    println!("format:         {}", h.format_version);
    println!("app:            {}", h.app);
    println!("state version:  {}", h.state_version);
    println!(
        "written by:     {} (generation {})",
        h.writer_version, h.generation
    );
    println!("binary:         {}", h.binary.display());
    println!(
        "size:           {} bytes ({} bytes of state)",
        snap.encoded_len(),
        snap.payload().len()
    );
    println!("manifest:       {} descriptors", snap.manifest.len());
    let m = &snap.manifest;
    for e in m.entries.iter().take(20) {
        println!("  fd {:>5}  {:?}  {}", e.fd, e.kind, e.name);
    }
    if m.entries.len() > 20 {
        println!("  ... and {} more", m.entries.len() - 20);
    }
    for g in &m.groups {
        let fds: Vec<String> = g
            .members
            .iter()
            .take(8)
            .map(|x| format!("{}={}", x.id, x.fd))
            .collect();
        let more = g.members.len().saturating_sub(fds.len());
        let more = if more > 0 {
            format!(", ... and {more} more")
        } else {
            String::new()
        };
        println!(
            "  group {}: {} connections (id=fd: {}{more})",
            g.name,
            g.members.len(),
            fds.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `copyover migrate PID --back`: every user back to PID, from the new
/// process of its gradual migration; waits for PID's outcome.
fn move_back(t: &Target) -> Result<ExitCode, Failure> {
    let dir = t.dir.clone();
    let before = ask(t, &move |s: &Status| request_move_back(s, &dir))?;
    await_outcome(
        t,
        &before,
        "while its users were moving back",
        "is a gradual migration under way? (see the server's log)",
        |outcome| matches!(outcome, Outcome::RolledBack { reason } if reason.contains("moved back")),
    )
}
