//! The probe: asking the new binary, before the point of no return, whether
//! it is a copyover program for this application that can read this state.
//!
//! # Protocol, version 1
//!
//! The old image starts the new binary as a child with:
//!
//! * the old image's arguments (a program with subcommands reaches `boot`
//!   the same way it did), its environment without the handoff variable and
//!   with `COPYOVER_PROBE=NONCE`;
//! * the sealed snapshot on its standard input (fd 0);
//! * a pipe on its standard output, and one on its standard error that the
//!   probe passes on to the server's standard error as it comes, keeping
//!   its last lines: a refusal that is not the new binary's own says how it
//!   ended (exit status or signal) and quotes them.
//!
//! A copyover program's [`boot`](crate::boot) sees the variable, reads and
//! checks the snapshot exactly as a real restore would (seals, header, app,
//! checksum, state version, decoding and migration), writes one line and
//! exits:
//!
//! * `copyover-probe 1 ok NONCE VERSION` and exit status 0 (with
//!   `COPYOVER_PROBE_MIGRATE=1` set, the probe of a migration: `ok-migrate`
//!   instead of `ok`: a build whose runtime predates migrations says `ok`,
//!   which the probe of a migration refuses), or
//! * `copyover-probe 1 refuse NONCE REASON` and exit status 1.
//!
//! Anything else (no line, another nonce, another exit status, no answer
//! within the probe timeout) is a refusal: `/bin/true`, a shell script, or a
//! server of another kind are all refused, and the old image keeps serving.
//!
//! The probe runs on the runtime's helper thread (started in `boot`, see
//! `worker`), so the event loop keeps serving while the snapshot is written
//! and the new binary starts; the thread wakes the
//! loop when it has the verdict. A new binary that ignores the probe
//! variable runs with the old image's arguments until the time limit kills
//! it: if it is a server of another kind, its start-up fails on the ports
//! this one holds, or it is killed after the limit (5 s by default).

use std::ffi::{CString, OsStr, OsString};
use std::io::{BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use crate::env::{PROBE_MIGRATE_VAR, PROBE_VAR};
const ANSWER_PREFIX: &str = "copyover-probe 1";

/// The verdict of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The new binary can take over; its version label.
    Accepted(String),
    /// It cannot, and why.
    Refused(String),
}

/// A probe running on the runtime's helper thread (see `worker`).
#[derive(Debug)]
pub(crate) struct Probe {
    verdict: Arc<Mutex<Option<Outcome>>>,
    child_pid: Arc<AtomicI32>,
}

/// The new binary, opened once when the upgrade starts: the probe runs it,
/// and the commit executes it, from this descriptor. A deploy that replaces
/// the file in between changes nothing: the file that answered the probe is
/// the file that runs (a second deploy needs a second SIGHUP).
#[derive(Debug)]
pub(crate) struct Executable {
    /// Read-only, close-on-exec.
    pub fd: OwnedFd,
    /// The path it was opened from (for messages and the snapshot header).
    pub path: PathBuf,
    /// It starts with `#!`: its interpreter opens `/dev/fd/N`, so the fd
    /// must stay open across the exec.
    pub script: bool,
}

impl Executable {
    /// Opens `path` after checking that it is an executable regular file.
    pub(crate) fn open(path: &Path) -> Result<Executable, crate::UpgradeError> {
        let fail = |source: std::io::Error| crate::UpgradeError::Binary {
            path: path.to_owned(),
            source,
        };
        crate::sys::check_executable(path).map_err(fail)?;
        let file = std::fs::File::open(path).map_err(fail)?;
        if !file.metadata().map_err(fail)?.is_file() {
            return Err(fail(std::io::Error::other("not a regular file")));
        }
        let mut magic = [0u8; 2];
        use std::os::unix::fs::FileExt;
        let n = file.read_at(&mut magic, 0).map_err(fail)?;
        Ok(Executable {
            fd: OwnedFd::from(file),
            path: path.to_owned(),
            script: n == 2 && magic == *b"#!",
        })
    }

    /// The path under which a child can execute this very file.
    pub(crate) fn proc_path(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// What a probe needs to start.
pub(crate) struct ProbeSpec {
    /// The new binary.
    pub exe: Arc<Executable>,
    /// The old image's argument vector, `argv[0]` included.
    pub argv: Vec<CString>,
    pub env: Vec<(OsString, OsString)>,
    /// The snapshot to show the probe, written (and sealed) on the probe's
    /// thread, so that the event loop only pays for encoding it.
    pub header: crate::snapshot::Header,
    pub manifest: crate::snapshot::Manifest,
    pub payload: Vec<u8>,
    pub timeout: Duration,
    /// Bytes to prepare in the commit's memfd while the probe runs.
    pub reserve: u64,
    /// The probe of a migration: the binary must say it can take part.
    pub migrate: bool,
}

/// What a finished probe hands back: its verdict, and what it prepared
/// for the commit.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub verdict: Verdict,
    pub prepared: Prepared,
}

/// What the probe prepares for the commit while the new binary starts, off
/// the commit's critical path; the approved phase owns it until the commit
/// takes it. Either part may be missing (it failed): the commit makes it
/// then.
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    /// The memfd for the commit's snapshot, allocated and mapped.
    pub draft: Option<crate::snapshot::Draft>,
    /// How this image runs, sealed for a rollback (`upgrade::record`).
    pub record: Option<OwnedFd>,
}

impl Probe {
    /// Starts the probe thread; `wake` is written to once the verdict is in.
    pub(crate) fn start(
        spec: ProbeSpec,
        worker: &crate::worker::Worker,
        wake: Arc<OwnedFd>,
    ) -> std::io::Result<Probe> {
        let child_pid = Arc::new(AtomicI32::new(0));
        let verdict = Arc::new(Mutex::new(None));
        let (pid, slot) = (child_pid.clone(), verdict.clone());
        worker.run(move || {
            let v = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(spec, &pid)))
                .unwrap_or_else(|_| Outcome {
                    verdict: Verdict::Refused("the probe panicked".into()),
                    prepared: Prepared::default(),
                });
            // The verdict is in its slot before the loop is woken.
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
            crate::signal::wake(&wake);
        })?;
        Ok(Probe { verdict, child_pid })
    }

    /// A probe whose verdict is `outcome` (`None`: still running), for tests
    /// of what the phases do with it.
    #[cfg(test)]
    pub(crate) fn with_verdict(outcome: Option<Outcome>) -> Probe {
        Probe {
            verdict: Arc::new(Mutex::new(outcome)),
            child_pid: Arc::new(AtomicI32::new(0)),
        }
    }

    /// The verdict, once it is in; `Err(self)` while the probe runs.
    pub(crate) fn try_verdict(self) -> Result<Outcome, Probe> {
        let taken = self
            .verdict
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match taken {
            Some(v) => Ok(v),
            None => Err(self),
        }
    }

    /// Kills the probe child and whatever it started (its process group),
    /// if it still runs (used when the server stops).
    pub(crate) fn kill(&self) {
        let pid = self.child_pid.load(Ordering::SeqCst);
        if pid > 0 {
            let _ = crate::sys::kill_group(pid);
        }
    }
}

fn nonce() -> String {
    format!("{:x}{:x}", std::process::id(), crate::sys::monotonic_ns())
}

fn run(spec: ProbeSpec, pid_slot: &AtomicI32) -> Outcome {
    if let Some(reason) = repeated_id(&spec.manifest) {
        return Outcome {
            verdict: Verdict::Refused(reason),
            prepared: Prepared::default(),
        };
    }
    let nonce = nonce();
    let snapshot = match crate::snapshot::write_sealed(&spec.header, &spec.manifest, &spec.payload)
    {
        Ok(fd) => fd,
        Err(e) => {
            return Outcome {
                verdict: Verdict::Refused(format!("could not write the snapshot: {e}")),
                prepared: Prepared::default(),
            };
        }
    };
    drop(spec.payload);
    warn_unkept_listeners(&spec.manifest);
    let mut cmd = command(&spec.exe, &spec.argv, &spec.env);
    // Its own process group: a wrapper script's children (the real binary,
    // a `sleep`) are killed with it, not left behind.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    if spec.migrate {
        cmd.env(PROBE_MIGRATE_VAR, "1");
    }
    cmd.env(PROBE_VAR, &nonce)
        .stdin(Stdio::from(snapshot))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let verdict = Verdict::Refused(format!("could not start {:?}: {e}", spec.exe.path));
            return Outcome {
                verdict,
                prepared: Prepared::default(),
            };
        }
    };
    // The probe's time limit counts from its start.
    let started = Instant::now();
    pid_slot.store(child.id() as i32, Ordering::SeqCst);
    // While the new binary starts: the commit's memfd, allocated and mapped.
    let draft = crate::snapshot::Draft::new(spec.reserve).ok();
    let record = crate::env::env_entries(&spec.env)
        .ok()
        .and_then(|env| super::record::ExecRecord::seal(&spec.argv, &env).ok());
    let mut stderr = Stderr {
        pipe: child.stderr.take(),
        tail: Vec::new(),
    };
    let deadline = started + spec.timeout;
    let answer = read_answer(
        &mut child,
        &mut stderr,
        &nonce,
        spec.migrate,
        spec.timeout,
        deadline,
    );
    let ended = finish(&mut child, &mut stderr, deadline);
    stderr.pump_ready();
    let verdict = judge(answer, ended, &stderr);
    pid_slot.store(0, Ordering::SeqCst);
    tracing::debug!(
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
        ?verdict,
        "probe finished"
    );
    Outcome {
        verdict,
        prepared: Prepared { draft, record },
    }
}

/// The new binary as a command: executed from the probed descriptor (a
/// script's too: its interpreter reads `/dev/fd/N`), with this image's
/// arguments and exactly `env`. The probe and a migration's newcomer start
/// this way.
pub(crate) fn command(exe: &Executable, argv: &[CString], env: &[(OsString, OsString)]) -> Command {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(exe.proc_path());
    if exe.script {
        use std::os::fd::AsRawFd;
        crate::sys::keep_fd_in_child(&mut cmd, exe.fd.as_raw_fd());
    }
    if let Some(argv0) = argv.first() {
        cmd.arg0(OsStr::from_bytes(argv0.as_bytes()));
    }
    cmd.args(argv.iter().skip(1).map(|a| OsStr::from_bytes(a.as_bytes())));
    cmd.env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_os_str(), v.as_os_str())));
    cmd
}

/// Warns about listening sockets that an upgrade would close (docs/design.md's
/// "unregistered listeners are lost silently"). Runs on the probe's thread,
/// off the event loop: it reads `/proc/self/fd`, which is long for a server
/// with many connections.
///
/// A listener kept under another descriptor (a duplicate of it is in the
/// handoff, as `copyover::tokio::Server` keeps them) is the same socket and
/// stays open: sockets are told apart by what `/proc/self/fd` links to
/// (`socket:[inode]`), not by their number.
fn warn_unkept_listeners(manifest: &crate::snapshot::Manifest) {
    let lost = unkept_listeners(manifest.fds());
    if !lost.is_empty() {
        tracing::warn!(fds = ?lost, "listening sockets not in the handoff will be closed by the upgrade");
    }
}

/// The listening sockets of this process that none of `kept` is.
fn unkept_listeners(kept: impl Iterator<Item = i32>) -> Vec<i32> {
    let kept: std::collections::HashSet<i32> = kept.collect();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let unkept: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|fd| *fd >= 3 && !kept.contains(fd) && crate::sys::is_listening(*fd))
        .collect();
    if unkept.is_empty() {
        return unkept;
    }
    let socket = |fd: i32| std::fs::read_link(format!("/proc/self/fd/{fd}")).ok();
    let kept_sockets: std::collections::HashSet<_> =
        kept.iter().filter_map(|fd| socket(*fd)).collect();
    unkept
        .into_iter()
        .filter(|fd| socket(*fd).is_none_or(|s| !kept_sockets.contains(&s)))
        .collect()
}

/// A group of connections that names one id twice: the new image would get
/// two connections under one key, and an application that files them by id
/// (a map) would close one of them. Checked here, on the probe's thread,
/// not in the commit, where it would cost every client time.
fn repeated_id(manifest: &crate::snapshot::Manifest) -> Option<String> {
    manifest.groups.iter().find_map(|g| {
        let mut ids: Vec<u64> = g.members.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        let twice = ids.windows(2).find(|w| w[0] == w[1])?[0];
        Some(format!(
            "the handoff's group '{}' names connection {twice} twice: ids must be unique in a group",
            g.name
        ))
    })
}

/// What the probe's standard output said.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// `ok`, with the new binary's version label.
    Ok(String),
    /// `refuse`, with the new binary's own reason.
    Refuse(String),
    /// No valid answer line, and why it is not one.
    Invalid(String),
}

/// The verdict from the answer and how the child ended. A refusal the new
/// binary did not word itself says how it ended (exit status or signal) and
/// what it last wrote on its standard error: "it is not a copyover program"
/// alone leaves the operator guessing whether it is another program, a
/// build that rejects the server's arguments, or one that crashed.
fn judge(answer: Answer, ended: Result<ExitStatus, String>, stderr: &Stderr) -> Verdict {
    let (reason, ended) = match (answer, ended) {
        (Answer::Ok(version), Ok(status)) if status.success() => {
            return Verdict::Accepted(version);
        }
        (Answer::Refuse(reason), _) => return Verdict::Refused(reason),
        (Answer::Ok(_), ended) => ("it answered ok".to_owned(), ended),
        (Answer::Invalid(reason), ended) => (reason, ended),
    };
    let how = match ended {
        Ok(status) => describe(status),
        Err(e) => e,
    };
    let words = match stderr.last_words() {
        Some(words) => format!("; its last words on standard error: {words:?}"),
        None => "; it wrote nothing on standard error".to_owned(),
    };
    Verdict::Refused(format!("{reason}; {how}{words}"))
}

/// How a child ended, in words.
pub(crate) fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("it exited with status {code}"),
        (None, Some(signal)) => match nix::sys::signal::Signal::try_from(signal) {
            Ok(name) => format!("it was killed by signal {signal} ({name})"),
            Err(_) => format!("it was killed by signal {signal}"),
        },
        (None, None) => format!("it ended with {status}"),
    }
}

/// The probe's standard error: passed on to the server's as it comes (the
/// new binary's log lines stay where the operator reads the server's), its
/// last bytes kept for a refusal's reason.
#[derive(Debug)]
struct Stderr {
    /// `None` once it reached its end (or failed).
    pipe: Option<std::process::ChildStderr>,
    tail: Vec<u8>,
}

/// How much of the probe's standard error is kept for its last words.
const STDERR_TAIL: usize = 4096;
/// How many of its last lines a refusal quotes, and at most how many chars.
const LAST_LINES: usize = 3;
const LAST_CHARS: usize = 400;

impl Stderr {
    fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.pipe.as_ref().map(|p| p.as_fd())
    }

    /// One read, once the pipe polled readable (so it does not wait).
    fn pump(&mut self) {
        let Some(pipe) = self.pipe.as_mut() else {
            return;
        };
        let mut buf = [0u8; 4096];
        match pipe.read(&mut buf) {
            Ok(0) => self.pipe = None,
            Ok(n) => {
                let _ = std::io::stderr().write_all(&buf[..n]);
                self.tail.extend_from_slice(&buf[..n]);
                let over = self.tail.len().saturating_sub(STDERR_TAIL);
                self.tail.drain(..over);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => self.pipe = None,
        }
    }

    /// Reads what is in the pipe now, without waiting (bounded: a child
    /// that writes without end does not hold the probe here).
    fn pump_ready(&mut self) {
        for _ in 0..32 {
            let ready = match self.fd() {
                Some(fd) => crate::sys::readable_among(&[fd], Duration::ZERO),
                None => return,
            };
            match ready.as_deref() {
                Ok([true]) => self.pump(),
                _ => return,
            }
        }
    }

    /// Its last few non-empty lines, joined into one line.
    fn last_words(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.tail);
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let last = &lines[lines.len().saturating_sub(LAST_LINES)..];
        if last.is_empty() {
            return None;
        }
        let joined = last.join(" | ");
        let count = joined.chars().count();
        Some(
            joined
                .chars()
                .skip(count.saturating_sub(LAST_CHARS))
                .collect(),
        )
    }
}

/// Reads the one answer line, up to the deadline, passing the child's
/// standard error on meanwhile.
fn read_answer(
    child: &mut Child,
    stderr: &mut Stderr,
    nonce: &str,
    migrate: bool,
    timeout: Duration,
    deadline: Instant,
) -> Answer {
    let Some(stdout) = child.stdout.take() else {
        return Answer::Invalid("no pipe to the probe".into());
    };
    let mut line = Vec::new();
    let mut reader = BufReader::new(stdout);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Answer::Invalid(format!(
                "no answer within {timeout:?}: not a copyover program, or it hangs"
            ));
        }
        if reader.buffer().is_empty() {
            let ready = {
                let mut fds = vec![reader.get_ref().as_fd()];
                fds.extend(stderr.fd());
                match crate::sys::readable_among(&fds, left) {
                    Ok(ready) => ready,
                    Err(e) => return Answer::Invalid(format!("polling the probe failed: {e}")),
                }
            };
            if ready.get(1) == Some(&true) {
                stderr.pump();
            }
            if ready.first() != Some(&true) {
                continue;
            }
        }
        let mut byte = [0u8; 1];
        match reader.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < 4096 => line.push(byte[0]),
            Ok(_) => return Answer::Invalid("the probe answered with an overlong line".into()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Answer::Invalid(format!("reading the probe's answer failed: {e}")),
        }
    }
    parse_answer(&String::from_utf8_lossy(&line), nonce, migrate)
}

/// Parses the answer line. `migrate`: the probe of a migration, which only
/// `ok-migrate` approves.
fn parse_answer(line: &str, nonce: &str, migrate: bool) -> Answer {
    let Some(rest) = line
        .strip_prefix(ANSWER_PREFIX)
        .and_then(|r| r.strip_prefix(' '))
    else {
        let shown: String = line.chars().take(80).collect();
        return Answer::Invalid(if line.is_empty() {
            "the new binary gave no probe answer: it is not a copyover program".into()
        } else {
            format!(
                "the new binary's answer {shown:?} is not a probe answer: it is not a copyover program"
            )
        });
    };
    let (verb, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    let (their_nonce, detail) = rest.split_once(' ').unwrap_or((rest, ""));
    if their_nonce != nonce {
        return Answer::Invalid("the probe answer carries another nonce".into());
    }
    match verb {
        "ok" if migrate => Answer::Refuse(
            "it cannot take part in a migration (its copyover runtime predates migrations: \
             it would start fresh beside this process)"
                .into(),
        ),
        "ok" | "ok-migrate" => Answer::Ok(detail.to_owned()),
        "refuse" => Answer::Refuse(detail.to_owned()),
        other => Answer::Invalid(format!("unknown probe verdict {other:?}")),
    }
}

/// Waits for the child to exit, killing it at the deadline, and passes its
/// standard error on meanwhile; either way, whatever it left running in its
/// process group is killed before it is reaped (while it is unreaped, its
/// group's number cannot be reused).
fn finish(child: &mut Child, stderr: &mut Stderr, deadline: Instant) -> Result<ExitStatus, String> {
    let pid = child.id() as i32;
    loop {
        match crate::sys::has_exited(pid) {
            Ok(true) => {
                let _ = crate::sys::kill_group(pid);
                return child
                    .wait()
                    .map_err(|e| format!("waiting for the probe failed: {e}"));
            }
            Ok(false) if Instant::now() >= deadline => {
                if crate::sys::kill_group(pid).is_err() {
                    let _ = child.kill();
                }
                let _ = child.wait();
                return Err("it did not exit in time and was killed".into());
            }
            Ok(false) => match stderr.fd() {
                // A millisecond's wait, cut short by the child's output.
                Some(fd) => match crate::sys::readable_among(&[fd], Duration::from_millis(1)) {
                    Ok(ready) if ready == [true] => stderr.pump(),
                    Ok(_) => {}
                    // Not a wait: one, so as not to spin.
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                },
                None => std::thread::sleep(Duration::from_millis(1)),
            },
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("waiting for the probe failed: {e}")),
        }
    }
}

/// The child side: writes the answer line to stdout and exits.
pub(crate) fn answer(nonce: &OsStr, result: Result<String, String>) -> ! {
    let nonce = nonce.to_string_lossy();
    // Asked by a migration: this build can take part in one.
    let verb = if std::env::var_os(PROBE_MIGRATE_VAR).is_some() {
        "ok-migrate"
    } else {
        "ok"
    };
    let line = match &result {
        Ok(version) => format!("{ANSWER_PREFIX} {verb} {nonce} {version}\n"),
        Err(reason) => format!(
            "{ANSWER_PREFIX} refuse {nonce} {}\n",
            reason.replace('\n', " ")
        ),
    };
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
    std::process::exit(if result.is_ok() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_kept_under_a_duplicate_is_not_reported_lost() {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let duplicate = listener.try_clone().unwrap();
        let (fd, dup) = (listener.as_raw_fd(), duplicate.as_raw_fd());
        let lost = unkept_listeners(std::iter::once(dup));
        assert!(!lost.contains(&fd) && !lost.contains(&dup), "{lost:?}");
        // Kept under neither number: both are the lost socket.
        let lost = unkept_listeners(std::iter::empty());
        assert!(lost.contains(&fd) && lost.contains(&dup), "{lost:?}");
    }

    #[test]
    fn a_group_naming_an_id_twice_is_refused() {
        use crate::snapshot::{GroupMember, Manifest, ManifestGroup};
        let group = |ids: &[u64]| Manifest {
            entries: Vec::new(),
            groups: vec![ManifestGroup {
                name: "conn".into(),
                members: ids
                    .iter()
                    .enumerate()
                    .map(|(i, &id)| GroupMember {
                        id,
                        fd: 10 + i as i32,
                    })
                    .collect(),
            }],
        };
        assert_eq!(repeated_id(&group(&[3, 1, 2])), None);
        let err = repeated_id(&group(&[3, 1, 3])).unwrap();
        assert!(err.contains("'conn' names connection 3 twice"), "{err}");
    }

    #[test]
    fn answers_are_parsed_strictly() {
        assert_eq!(
            parse_answer("copyover-probe 1 ok N v2", "N", false),
            Answer::Ok("v2".into())
        );
        // A migration's probe: only a build that knows migrations approves.
        assert_eq!(
            parse_answer("copyover-probe 1 ok-migrate N v2", "N", true),
            Answer::Ok("v2".into())
        );
        assert!(
            matches!(parse_answer("copyover-probe 1 ok N v2", "N", true), Answer::Refuse(r) if r.contains("predates migrations"))
        );
        assert_eq!(
            parse_answer("copyover-probe 1 refuse N cannot read v3", "N", false),
            Answer::Refuse("cannot read v3".into())
        );
        assert!(
            matches!(parse_answer("copyover-probe 1 ok M v2", "N", false), Answer::Invalid(r) if r.contains("nonce"))
        );
        assert!(
            matches!(parse_answer("", "N", false), Answer::Invalid(r) if r.contains("no probe answer"))
        );
        assert!(
            matches!(parse_answer("hello", "N", false), Answer::Invalid(r) if r.contains("not a copyover program"))
        );
        assert!(
            matches!(parse_answer("copyover-probe 1 maybe N", "N", false), Answer::Invalid(r) if r.contains("\"maybe\""))
        );
    }

    fn stderr_of(text: &str) -> Stderr {
        Stderr {
            pipe: None,
            tail: text.as_bytes().to_vec(),
        }
    }

    fn exited(code: i32) -> Result<ExitStatus, String> {
        use std::os::unix::process::ExitStatusExt;
        Ok(ExitStatus::from_raw(code << 8))
    }

    #[test]
    fn a_refusal_says_how_the_binary_ended_and_its_last_words() {
        let invalid = || Answer::Invalid("the new binary gave no probe answer".into());
        let words =
            stderr_of("starting\n\nerror: unexpected argument '--port' found\n  \nUsage: x\n");
        let Verdict::Refused(r) = judge(invalid(), exited(2), &words) else {
            panic!("accepted")
        };
        assert_eq!(
            r,
            "the new binary gave no probe answer; it exited with status 2; its last words on \
             standard error: \"starting | error: unexpected argument '--port' found | Usage: x\""
        );
        use std::os::unix::process::ExitStatusExt;
        let killed = Ok(ExitStatus::from_raw(libc::SIGSEGV));
        let Verdict::Refused(r) = judge(invalid(), killed, &stderr_of("")) else {
            panic!("accepted")
        };
        assert!(
            r.ends_with("it was killed by signal 11 (SIGSEGV); it wrote nothing on standard error"),
            "{r}"
        );
        let late = Err("it did not exit in time and was killed".into());
        let Verdict::Refused(r) = judge(Answer::Ok("v2".into()), late, &stderr_of("")) else {
            panic!("accepted")
        };
        assert!(
            r.starts_with("it answered ok; it did not exit in time"),
            "{r}"
        );
        let Verdict::Refused(r) = judge(Answer::Ok("v2".into()), exited(3), &stderr_of("")) else {
            panic!("accepted")
        };
        assert!(
            r.starts_with("it answered ok; it exited with status 3"),
            "{r}"
        );
        // The binary's own refusal is its own words, nothing added.
        let own = judge(
            Answer::Refuse("no migration from v9".into()),
            exited(1),
            &words,
        );
        assert_eq!(own, Verdict::Refused("no migration from v9".into()));
        assert_eq!(
            judge(Answer::Ok("v2".into()), exited(0), &words),
            Verdict::Accepted("v2".into())
        );
    }

    #[test]
    fn last_words_are_bounded() {
        let long = format!("{}\n", "x".repeat(1000));
        let words = stderr_of(&long).last_words().unwrap();
        assert_eq!(words.chars().count(), LAST_CHARS);
        let mut stderr = stderr_of("");
        assert_eq!(stderr.last_words(), None);
        stderr.tail = vec![b'a'; STDERR_TAIL];
        assert!(stderr.last_words().is_some());
    }
}
