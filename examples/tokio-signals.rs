//! The subject of tests/tokio_signals.rs, not a template: a tokio server
//! with 16 worker threads and 64 busy tasks that upgrades itself on SIGHUP
//! and reports what it sees on a Unix datagram socket (kept across the exec
//! with `Handoff::datagram`):
//!
//! * `ready gen=G pending=SIGS usr1=N`: serving, with the held signals that
//!   were pending when this image started (they crossed the exec pending);
//! * `commit gen=G`: every task parked, the commit starts now;
//! * `usr1 N`, `shutdown gen=G`, `refused`, `commit failed`;
//! * `pong gen=G usr1=N upgrading=B` for each datagram it receives.
//!
//! It reports to `$COPYOVER_SIGTEST_SOCK` and listens on that path with
//! `.server` appended. `COPYOVER_SIGTEST_NO_MASK=1` leaves the reload
//! signals unblocked in the worker threads (how a tokio server loses them).

use std::error::Error;
use std::time::Duration;

use copyover::tokio::{AsyncCopyover, Quiesce, SafePoint, TakeTokio};
use copyover::{AppState, Config, Event, Handoff, Start};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use serde::{Deserialize, Serialize};
use tokio::net::UnixDatagram;

#[derive(Serialize, Deserialize, Default)]
struct State {
    usr1: u64,
}

impl AppState for State {
    const VERSION: u32 = 1;
}

const HELD: [(Signal, &str); 4] = [
    (Signal::SIGHUP, "HUP"),
    (Signal::SIGTERM, "TERM"),
    (Signal::SIGINT, "INT"),
    (Signal::SIGUSR1, "USR1"),
];

fn main() -> Result<(), Box<dyn Error>> {
    // Before `boot` unblocks them: the held signals pending right now came
    // across the exec.
    // (`SigPnd`: this thread's, `ShdPnd`: the process's.)
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mask = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let set = mask("SigPnd:") | mask("ShdPnd:");
    let pending: Vec<&str> = HELD
        .iter()
        .filter(|(sig, _)| set & (1u64 << (*sig as i32 - 1)) != 0)
        .map(|(_, name)| *name)
        .collect();
    let pending = if pending.is_empty() {
        "-".to_string()
    } else {
        pending.join(",")
    };
    let (co, start) = copyover::boot::<State>(Config::new("tokio-signals", "x"))?;
    let no_mask = std::env::var_os("COPYOVER_SIGTEST_NO_MASK").is_some();
    let runtime = if no_mask {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.enable_all().worker_threads(16).build()?
    } else {
        copyover::tokio::build_runtime(copyover::tokio::runtime_builder().worker_threads(16))?
    };
    runtime.block_on(run(co, start, pending, no_mask))
}

async fn busy(safe: SafePoint<()>) {
    loop {
        tokio::select! {
            () = safe.requested() => return safe.park(()),
            () = tokio::time::sleep(Duration::from_micros(300)) => {}
        }
    }
}

async fn run(
    co: copyover::Copyover<State>,
    start: Start<State>,
    pending: String,
    no_mask: bool,
) -> Result<(), Box<dyn Error>> {
    let to = std::env::var("COPYOVER_SIGTEST_SOCK")?;
    let mut co = AsyncCopyover::new(co)?;
    let (mut state, sock) = match start {
        Start::Fresh => {
            let path = format!("{to}.server");
            let _ = std::fs::remove_file(&path);
            (State::default(), UnixDatagram::bind(&path)?)
        }
        Start::Resumed { state, mut fds } => {
            let sock = fds.take_tokio_unix_datagram("report")?;
            (state, sock.ok_or("no report socket")?)
        }
    };
    co.ready()?;
    let quiesce = Quiesce::new();
    for _ in 0..64 {
        tokio::spawn(busy(quiesce.join()));
    }
    // Reports go out on a blocking socket of their own.
    let out = std::os::unix::net::UnixDatagram::unbound()?;
    let report = |text: String| {
        let _ = out.send_to(text.as_bytes(), &to);
    };
    let generation = co.generation();
    report(format!(
        "ready gen={generation} pending={pending} usr1={}",
        state.usr1
    ));
    let mut upgrading = false;
    let mut buf = [0u8; 64];
    loop {
        tokio::select! {
            biased;
            event = co.next_event() => match event {
                Event::Upgrade => {
                    upgrading = true;
                    let mut keep = Handoff::new();
                    keep.datagram("report", &sock);
                    let _ = upgrade(&mut co, no_mask, &state, &keep);
                }
                Event::UpgradeApproved => {
                    let parked = match quiesce.pause().await {
                        Ok(parked) => parked,
                        Err(unpaused) => {
                            report(format!("commit failed: {unpaused}"));
                            co.abandon(&unpaused.to_string());
                            upgrading = false;
                            for () in unpaused.parked {
                                tokio::spawn(busy(quiesce.join()));
                            }
                            continue;
                        }
                    };
                    let mut keep = Handoff::new();
                    keep.datagram("report", &sock);
                    report(format!("commit gen={generation}"));
                    let err = upgrade(&mut co, no_mask, &state, &keep);
                    report(format!("commit failed: {err:?}"));
                    upgrading = false;
                    quiesce.resume();
                    for () in parked {
                        tokio::spawn(busy(quiesce.join()));
                    }
                }
                Event::UpgradeRefused { reason } => {
                    upgrading = false;
                    report(format!("refused: {reason}"));
                }
                Event::SaveSnapshot => {
                    state.usr1 += 1;
                    report(format!("usr1 {}", state.usr1));
                }
                Event::Shutdown => {
                    report(format!("shutdown gen={generation}"));
                    // Without waiting for the busy tasks.
                    std::process::exit(0);
                }
                _ => {}
            },
            got = sock.recv(&mut buf) => {
                if got.is_ok() {
                    report(format!("pong gen={generation} usr1={} upgrading={upgrading}", state.usr1));
                }
            }
        }
    }
}

/// The library's upgrade (the held signals masked while the probe's thread
/// starts), or with `no_mask` the core's as a hand-written port calls it.
fn upgrade(
    co: &mut AsyncCopyover<State>,
    no_mask: bool,
    state: &State,
    keep: &Handoff<'_>,
) -> Result<copyover::Progress, copyover::UpgradeError> {
    if no_mask {
        // Unblocked in this thread too, whatever the runtime did.
        let _ = pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&SigSet::all()), None);
        std::ops::DerefMut::deref_mut(co).upgrade(state, keep)
    } else {
        co.upgrade(state, keep)
    }
}
