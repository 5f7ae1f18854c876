//! Shared helpers for the process tests: building labelled and faulty builds
//! of the demo, starting it from a scratch folder, deploying, signalling,
//! reading its log, and talking to it as a chat client.
//!
//! Every wait is a bounded poll on a condition; every server is killed and
//! reaped when its handle drops.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use copyover::status::{Outcome, Status, status_path};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long any single wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// Polls `f` until it returns `Some`, or panics with `what` after [`WAIT`].
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The workspace root: the tests are targets of bins/ (the programs'
/// package), and build, scratch and compare against the root's files.
fn manifest_dir() -> PathBuf {
    let bins = Path::new(env!("CARGO_MANIFEST_DIR"));
    bins.parent().unwrap_or(bins).to_path_buf()
}

/// The demo as `cargo test` built it (label = the crate version).
pub fn default_build() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_copyover-telnetd"))
}

/// A build of the demo with compile-time settings, e.g.
/// `[("COPYOVER_DEMO_LABEL", "v2")]`. Built once per set of settings (and
/// again when the test binary is newer), under a lock, so parallel tests
/// share the builds.
pub fn build(settings: &[(&str, &str)]) -> PathBuf {
    let target = manifest_dir().join("target").join("demo-builds");
    std::fs::create_dir_all(target.join("out")).expect("create target/demo-builds");
    let key: String = if settings.is_empty() {
        "default".into()
    } else {
        settings
            .iter()
            .map(|(k, v)| format!("{}={v}", k.trim_start_matches("COPYOVER_DEMO_")))
            .collect::<Vec<_>>()
            .join(",")
    };
    let out = target.join("out").join(key);
    let lock = std::fs::File::create(target.join(".lock")).expect("lock file");
    let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).expect("flock");
    let reference = std::fs::metadata(default_build())
        .and_then(|m| m.modified())
        .ok();
    let fresh = std::fs::metadata(&out).and_then(|m| m.modified()).ok();
    if fresh.is_some() && fresh >= reference {
        return out;
    }
    cargo_build(
        &target,
        &["--bin", "copyover-telnetd"],
        &[
            "COPYOVER_DEMO_LABEL",
            "COPYOVER_DEMO_FAULT",
            "COPYOVER_DEMO_STATE",
        ],
        settings,
    );
    std::fs::copy(target.join("debug").join("copyover-telnetd"), &out).expect("copy the build");
    out
}

/// `cargo build --quiet ARGS` of this workspace into `target`, with the
/// variables in `unset` (and RUSTFLAGS) removed and `settings` set.
fn cargo_build(target: &Path, args: &[&str], unset: &[&str], settings: &[(&str, &str)]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet"])
        .args(args)
        .arg("--manifest-path")
        .arg(manifest_dir().join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", target)
        .env_remove("RUSTFLAGS");
    for var in unset {
        cmd.env_remove(var);
    }
    for (k, v) in settings {
        cmd.env(k, v);
    }
    let status = cmd.status().expect("run cargo build");
    assert!(
        status.success(),
        "cargo build {args:?} with {settings:?} failed"
    );
}

/// A labelled build: `COPYOVER_DEMO_LABEL=label`.
pub fn labelled(label: &str) -> PathBuf {
    build(&[("COPYOVER_DEMO_LABEL", label)])
}

/// A fault build: `COPYOVER_DEMO_FAULT=fault`, labelled `bad-FAULT`.
pub fn faulty(fault: &str) -> PathBuf {
    build(&[
        ("COPYOVER_DEMO_LABEL", &format!("bad-{fault}")),
        ("COPYOVER_DEMO_FAULT", fault),
    ])
}

/// A scratch folder under target/, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = manifest_dir()
            .join("target")
            .join("test-scratch")
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Spawns, retrying on ETXTBSY: a file just copied can still be open for
/// writing in a child that another test thread forked at that moment.
pub fn spawn_retrying(cmd: &mut Command) -> Child {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Ok(c) => return c,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("could not start {cmd:?}: {e}"),
        }
    }
}

/// A running demo server.
pub struct Server {
    pub child: Child,
    pub pid: i32,
    pub addr: SocketAddr,
    pub binary: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    pub scratch: Scratch,
}

impl Server {
    /// Copies `build` into a scratch folder as `copyover-telnetd` and
    /// starts it there on an ephemeral port.
    pub fn start(name: &str, build: &Path) -> Server {
        Self::start_with(name, build, &[])
    }

    /// As [`start`](Self::start), with extra arguments.
    pub fn start_with(name: &str, build: &Path, args: &[&str]) -> Server {
        Self::spawn(name, build, |binary| {
            let mut cmd = Command::new(binary);
            cmd.args(["--listen", "127.0.0.1:0"]).args(args);
            cmd
        })
    }

    /// Starts the demo copied into a scratch folder with the command that
    /// `make` builds from the binary's path (extra environment, a wrapper).
    /// The scratch folder is its working directory; logs are collected.
    pub fn spawn(name: &str, build: &Path, make: impl FnOnce(&Path) -> Command) -> Server {
        let scratch = Scratch::new(name);
        let binary = scratch.0.join("copyover-telnetd");
        std::fs::copy(build, &binary).expect("copy the demo");
        let mut cmd = make(&binary);
        cmd.current_dir(&scratch.0)
            .env("RUST_LOG", "info,copyover=debug")
            .env("COPYOVER_STATUS_DIR", scratch.0.join("status"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = spawn_retrying(&mut cmd);
        let pid = child.id() as i32;
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("COPYOVER_TEST_ECHO").is_some() {
                    eprintln!("[server] {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        let mut server = Server {
            child,
            pid,
            addr: "127.0.0.1:1".parse().unwrap(),
            binary,
            log,
            scratch,
        };
        let line = server.wait_log(0, "listening addr=");
        let addr = line
            .split("addr=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .expect("addr in log");
        server.addr = addr.parse().expect("parse addr");
        server
    }

    /// Replaces the binary on disk by rename, as a deploy does.
    pub fn deploy(&self, build: &Path) {
        let tmp = self.scratch.0.join(".copyover-telnetd.new");
        std::fs::copy(build, &tmp).expect("copy the new build");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::rename(&tmp, &self.binary).expect("rename over the binary");
    }

    /// Deploys an arbitrary file's contents (a script, another program).
    pub fn deploy_bytes(&self, bytes: &[u8]) {
        let tmp = self.scratch.0.join(".copyover-telnetd.new");
        std::fs::write(&tmp, bytes).expect("write");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::rename(&tmp, &self.binary).expect("rename over the binary");
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid), sig).expect("send a signal");
    }

    /// Number of log lines so far: pass it to [`wait_log`](Self::wait_log)
    /// to wait for a line that comes after this point.
    pub fn mark(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Waits for a log line after `mark` that contains `pattern`.
    pub fn wait_log(&self, mark: usize, pattern: &str) -> String {
        wait_for(&format!("a server log line with {pattern:?}"), || {
            self.log
                .lock()
                .unwrap()
                .iter()
                .skip(mark)
                .find(|l| l.contains(pattern))
                .cloned()
        })
    }

    /// All log lines after `mark`.
    pub fn log_since(&self, mark: usize) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .skip(mark)
            .cloned()
            .collect()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends SIGHUP and waits for the outcome line: `upgrade complete`,
    /// `upgrade refused` or `upgrade rolled back`. Returns it, after
    /// checking that the status file (the typed outcome, which the runtime
    /// writes before the line) says the same.
    pub fn upgrade(&self) -> String {
        let mark = self.mark();
        self.signal(Signal::SIGHUP);
        let line = wait_for("an upgrade outcome in the log", || {
            self.log
                .lock()
                .unwrap()
                .iter()
                .skip(mark)
                .find(|l| {
                    l.contains("upgrade complete")
                        || l.contains("upgrade refused")
                        || l.contains("upgrade rolled back")
                })
                .cloned()
        });
        self.check_status_agrees(mark, &line);
        line
    }

    /// Processes still running with this server's environment (its status
    /// directory), other than the server itself: what its probes left
    /// behind, say.
    pub fn strays(&self) -> Vec<u32> {
        let mine = format!(
            "COPYOVER_STATUS_DIR={}",
            self.scratch.0.join("status").display()
        );
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != self.pid as u32)
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == mine.as_bytes()))
            })
            .collect()
    }

    /// The typed outcome of the status file, if the server could write one.
    pub fn status(&self) -> Option<Status> {
        Status::read(&status_path(
            &self.scratch.0.join("status"),
            self.pid as u32,
        ))
        .ok()
    }

    /// The status file names the outcome `line` logs, unless the server
    /// logged that it could not write it (a test of that) or the holder
    /// rescued it under another PID (whose file that is).
    fn check_status_agrees(&self, mark: usize, line: &str) {
        let log = self.log_since(mark).join("\n");
        if log.contains("status file") || line.contains("rescued=true") {
            return;
        }
        let word = |o: &Outcome| match o {
            Outcome::Complete { .. } => "upgrade complete",
            Outcome::Refused { .. } => "upgrade refused",
            Outcome::RolledBack { .. } => "upgrade rolled back",
            _ => "started",
        };
        let status = self.status();
        let said = status.as_ref().map(|s| word(&s.outcome));
        assert!(
            said.is_some_and(|w| line.contains(w)),
            "the log says {line:?}, the status file {status:?}"
        );
    }

    /// Open descriptors of the server.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .expect("read /proc/PID/fd")
            .count()
    }

    /// Child processes of the server (zombies included).
    pub fn children(&self) -> usize {
        let path = format!("/proc/{}/task/{}/children", self.pid, self.pid);
        std::fs::read_to_string(path)
            .map(|s| s.split_whitespace().count())
            .unwrap_or(0)
    }

    /// Whether the process is still alive (and not a zombie).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the server to exit; returns its status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        wait_for("the server to exit", || {
            self.child.try_wait().ok().flatten()
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- server log ----\n{}", self.log_text());
        }
    }
}

/// A chat client over plain TCP (like `nc`).
/// Reads from `stream` into `buf` until `buf` holds `end`, and returns the
/// bytes before it (taken out of `buf` with `end`). Panics, naming `name`,
/// on end of file, a read error, or no line within the tests' bound.
pub fn read_line(stream: &mut impl Read, buf: &mut Vec<u8>, name: &str, end: &[u8]) -> Vec<u8> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(pos) = buf.windows(end.len()).position(|w| w == end) {
            return buf.drain(..pos + end.len()).take(pos).collect();
        }
        assert!(
            Instant::now() < deadline,
            "{name}: timed out waiting for a line; have {:?}",
            String::from_utf8_lossy(buf)
        );
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) => panic!("{name}: the server closed the connection (EOF)"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("{name}: read failed: {e}"),
        }
    }
}

/// What the tests' chat clients share, plain or over TLS: lines out,
/// lines in.
pub trait Lines {
    /// Sends `text` as it is.
    fn send(&mut self, text: &str);

    /// The next whole line, without its end and without telnet commands.
    /// Panics on EOF or after [`WAIT`].
    fn line(&mut self) -> String;

    /// Reads lines until one equals `want`; returns the lines skipped.
    fn expect_line(&mut self, want: &str) -> Vec<String> {
        let mut skipped = Vec::new();
        loop {
            let l = self.line();
            if l == want {
                return skipped;
            }
            skipped.push(l);
        }
    }

    /// Reads lines until one contains `want`; returns it.
    fn expect_line_containing(&mut self, want: &str) -> String {
        loop {
            let l = self.line();
            if l.contains(want) {
                return l;
            }
        }
    }

    /// Sends a command and returns the next line.
    fn ask(&mut self, command: &str) -> String {
        self.send(&format!("{command}\r\n"));
        self.line()
    }
}

impl Lines for Client {
    fn send(&mut self, text: &str) {
        self.stream
            .write_all(text.as_bytes())
            .expect("send to the server");
    }

    fn line(&mut self) -> String {
        let raw = read_line(&mut self.stream, &mut self.buf, &self.name, b"\r\n");
        String::from_utf8_lossy(&strip_telnet(&raw)).into_owned()
    }
}

pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pub name: String,
}

impl Client {
    /// Connects and logs in as `name`.
    pub fn login(addr: SocketAddr, name: &str) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut c = Client {
            stream,
            buf: Vec::new(),
            name: name.into(),
        };
        c.expect_line_containing("copyover-telnetd");
        c.send(&format!("{name}\r\n"));
        c.expect_line(&format!("welcome, {name}"));
        c
    }

    /// Checks that nothing more is buffered or arriving now (no unexpected
    /// line, no EOF) within a short read.
    pub fn assert_quiet(&mut self) {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) => panic!("{}: EOF", self.name),
            Ok(n) => panic!(
                "{}: unexpected {:?}",
                self.name,
                String::from_utf8_lossy(&chunk[..n])
            ),
            Err(_) => assert!(
                self.buf.is_empty(),
                "{}: unexpected buffered {:?}",
                self.name,
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }
}

/// Removes telnet IAC sequences (the demo offers ECHO and SGA on connect).
pub fn strip_telnet(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == 255 && i + 1 < raw.len() {
            match raw[i + 1] {
                251..=254 => i += 3,
                255 => {
                    out.push(255);
                    i += 2
                }
                _ => i += 2,
            }
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    out
}

/// `n` connections that have not logged in yet (read timeout 50 ms): each
/// can prove later that its own socket still reaches the server
/// ([`log_in_each`]).
pub fn connect_many(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            s
        })
        .collect()
}

/// Logs each connection in as `PREFIX0`, `PREFIX1`... and waits for its
/// welcome; panics on an EOF.
pub fn log_in_each(conns: &mut [TcpStream], prefix: &str) {
    for (i, s) in conns.iter_mut().enumerate() {
        let name = format!("{prefix}{i}");
        s.write_all(format!("{name}\r\n").as_bytes()).expect("send");
        let mut seen = Vec::new();
        wait_for(&format!("{name}'s welcome"), || {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk) {
                Ok(0) => panic!("{name}: EOF"),
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
                Err(_) => {}
            }
            String::from_utf8_lossy(&seen)
                .contains(&format!("welcome, {name}"))
                .then_some(())
        });
    }
}

/// The new process a log line `migrated to process N: ...` names.
pub fn migrated_to(line: &str) -> i32 {
    line.split("migrated to process ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no new PID in {line:?}"))
}

/// strace attached to process `pid` and everything it starts (`-f`: a
/// holder, a migration's new process), injecting `injects`; `None` (and a SKIP line,
/// a failure under CI) where strace is missing.
pub fn traced(
    pid: i32,
    trace: &str,
    injects: &[&str],
    out: &std::path::Path,
) -> Option<std::process::Child> {
    let mut cmd = std::process::Command::new("strace");
    cmd.args(["-f", "-qq", "-o"])
        .arg(out)
        .args(["-e", &format!("trace={trace}")]);
    for inject in injects {
        cmd.args(["-e", &format!("inject={inject}")]);
    }
    cmd.args(["-p", &pid.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let Ok(child) = cmd.spawn() else {
        assert!(
            std::env::var_os("COPYOVER_CI").is_none(),
            "strace is needed (scripts/test installs it)"
        );
        eprintln!("SKIP: strace is not installed");
        return None;
    };
    // Attached once the server's TracerPid is strace's.
    let tracer = child.id().to_string();
    wait_for("strace to attach", || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()?
            .lines()
            .any(|l| l.starts_with("TracerPid:") && l.ends_with(&tracer))
            .then_some(())
    });
    Some(child)
}

/// Detaches strace (SIGINT) and returns its output.
pub fn detach(mut strace: std::process::Child, out: &std::path::Path) -> String {
    let _ = kill(Pid::from_raw(strace.id() as i32), Signal::SIGINT);
    let _ = strace.wait();
    std::fs::read_to_string(out).unwrap_or_default()
}

/// The `/version` line expected from a server.
/// A rescued server is nobody's child here: killed when the test ends,
/// whatever happens.
pub struct Reaper(pub i32);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
    }
}

/// The PID a `/version` answer names.
pub fn pid_in(version: &str) -> i32 {
    version
        .split("pid=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("a pid in /version")
}

pub fn version_line(label: &str, pid: i32, generation: u64) -> String {
    format!("copyover-telnetd {label} pid={pid} generation={generation}")
}

/// What a test deploys under a running server.
pub enum Deploy<'a> {
    Build(&'a Path),
    Bytes(&'a [u8]),
}

/// Deploys `bad` under a v1 server and checks the outcome line contains
/// `outcome` and `reason`; returns that line.
pub fn survive(name: &str, bad: Deploy<'_>, outcome: &str, reason: &str) -> String {
    let v2 = labelled("v2");
    let mut scene = Scene::start(name, "2");
    match bad {
        Deploy::Build(p) => scene.server.deploy(p),
        Deploy::Bytes(b) => scene.server.deploy_bytes(b),
    }
    let refused = scene.server.upgrade();
    assert!(
        refused.contains(outcome),
        "expected {outcome:?}, got: {refused}"
    );
    assert!(
        refused.contains(reason),
        "expected the reason to mention {reason:?}, got: {refused}"
    );

    // The old image serves, at the same PID, with everything.
    scene.everyone_kept("v1", 1, "");
    let (server, ann, bob) = (&scene.server, &mut scene.ann, &mut scene.bob);
    if !reason.contains("panicked") {
        assert!(
            !server.log_text().contains("panicked at"),
            "a panic in the server"
        );
    }

    // A good release still goes through afterwards.
    server.deploy(&v2);
    let line = server.upgrade();
    assert!(line.contains("upgrade complete"), "{line}");
    assert_eq!(bob.ask("/version"), version_line("v2", server.pid, 2));
    assert_eq!(ann.ask("/get color"), "color = green");
    ann.assert_quiet();
    refused
}

/// A v1 demo with ann (`color = green`) and bob logged in, after a first
/// good upgrade (descriptors the test harness leaked into the server are
/// closed by it, deny by default, so `fds` is a baseline), bob half-way
/// through typing "partial line".
pub struct Scene {
    pub server: Server,
    pub ann: Client,
    pub bob: Client,
    pub fds: usize,
}

impl Scene {
    /// Starts it with `--ready-timeout ready_timeout`.
    pub fn start(name: &str, ready_timeout: &str) -> Scene {
        let v1 = labelled("v1");
        let server = Server::start_with(name, &v1, &["--ready-timeout", ready_timeout]);
        let mut ann = Client::login(server.addr, "ann");
        let mut bob = Client::login(server.addr, "bob");
        assert_eq!(ann.ask("/set color green"), "ok");
        server.deploy(&v1);
        assert!(server.upgrade().contains("upgrade complete"));
        bob.send("par");
        // The baseline once the holder is gone (its end is reaped on the
        // runtime's helper thread, after the outcome is reported).
        wait_for("the holder to be reaped", || {
            (server.children() == 0).then_some(())
        });
        let fds = server.fd_count();
        Scene {
            server,
            ann,
            bob,
            fds,
        }
    }

    /// Checks what a user checks: `label` at `generation` at the same PID,
    /// ann's variable, bob's line delivered whole once, both online, no
    /// child left, the fd count unchanged. `context` goes into messages.
    pub fn everyone_kept(&mut self, label: &str, generation: u64, context: &str) {
        let (server, ann, bob) = (&self.server, &mut self.ann, &mut self.bob);
        assert_eq!(
            ann.ask("/version"),
            version_line(label, server.pid, generation),
            "{context}"
        );
        assert_eq!(ann.ask("/get color"), "color = green");
        bob.send("tial line\r\n");
        assert_eq!(ann.line(), "bob: partial line");
        assert_eq!(bob.ask("/who"), "online: ann, bob");
        wait_for("the probe to be reaped", || {
            (server.children() == 0).then_some(())
        });
        assert_eq!(
            server.fd_count(),
            self.fds,
            "{context}: the fd count changed"
        );
    }
}

/// A build of one of the crate's examples, with `--features tokio-util` and
/// compile-time settings such as `[("COPYOVER_CHAT_LABEL", "v2")]`, into
/// target/demo-builds like [`build`]. Built again when the test binary or
/// the example's source is newer than the copy.
pub fn example(name: &str, settings: &[(&str, &str)]) -> PathBuf {
    let target = manifest_dir().join("target").join("demo-builds");
    std::fs::create_dir_all(target.join("out")).expect("create target/demo-builds");
    let mut key = name.to_owned();
    for (k, v) in settings {
        key.push_str(&format!(",{k}={v}"));
    }
    let out = target.join("out").join(key);
    let lock = std::fs::File::create(target.join(".lock")).expect("lock file");
    let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).expect("flock");
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    // The library's sources too: the example's features (`tokio`) compile
    // code that the test binary's build does not, so its age says nothing.
    let source = manifest_dir().join("examples").join(format!("{name}.rs"));
    let reference = [
        std::env::current_exe().ok().and_then(|p| mtime(&p)),
        mtime(&source),
        mtime(&manifest_dir().join("Cargo.toml")),
        newest(&manifest_dir().join("src")),
    ]
    .into_iter()
    .max()
    .flatten();
    let fresh = mtime(&out);
    if fresh.is_some() && fresh >= reference {
        return out;
    }
    // The TLS variants need the `tls` feature too.
    let features = if name.ends_with("-tls") {
        "tokio-util,tls"
    } else {
        "tokio-util"
    };
    cargo_build(
        &target,
        &["--features", features, "--example", name],
        &[
            "COPYOVER_CHAT_LABEL",
            "COPYOVER_CHAT_FAULT",
            "COPYOVER_DEMO_LABEL",
        ],
        settings,
    );
    std::fs::copy(target.join("debug").join("examples").join(name), &out).expect("copy the build");
    out
}

/// The newest modification time of the files under `dir`.
fn newest(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            self::newest(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}
