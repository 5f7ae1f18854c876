//! The harness shared by `run` and `soak`: a server process started with
//! its log collected and a status directory of its own, waited on by log
//! line or by its typed outcome (the status file), signalled, and killed on
//! drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use copyover::status::{STATUS_DIR_VAR, Status, status_path};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::BoxError;

/// A running bench server and its log.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    /// The server's own status directory (removed on drop).
    status_dir: PathBuf,
}

impl Server {
    /// Starts a server (the bench server or the demo), collects its log and
    /// waits until it says where it listens.
    pub fn spawn(mut cmd: Command, log_filter: &str) -> Result<Server, BoxError> {
        static SERVERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SERVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let status_dir =
            std::env::temp_dir().join(format!("copyover-bench-status-{}-{n}", std::process::id()));
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().mode(0o700).create(&status_dir)?;
        }
        let mut child = cmd
            .env("RUST_LOG", log_filter)
            .env(STATUS_DIR_VAR, &status_dir)
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
            status_dir,
        };
        let line = server.wait(0, "listening addr=", Duration::from_secs(120))?;
        let addr = line
            .split("addr=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next());
        server.addr = addr.ok_or("no address in the log")?.parse()?;
        Ok(server)
    }

    /// The server's status (its status file), if it wrote one yet.
    pub fn status(&self) -> Option<Status> {
        Status::read(&status_path(&self.status_dir, self.child.id())).ok()
    }

    /// The sequence number of the server's last outcome (0 before the
    /// first): an upgrade's outcome is the first after it.
    pub fn seq(&self) -> u64 {
        self.status().map_or(0, |s| s.seq)
    }

    /// The outcome of the upgrade asked for after outcome `seq`, if it
    /// ended yet.
    pub fn outcome_since(&self, seq: u64) -> Option<Status> {
        self.status()
            .filter(|s| s.seq > seq && s.outcome.ends_an_upgrade())
    }

    /// Waits for the outcome of the upgrade asked for after outcome `seq`.
    ///
    /// The status file is read every millisecond, so that the harness
    /// takes little of the CPU the upgrade it measures runs on.
    pub fn wait_outcome(&mut self, seq: u64, limit: Duration) -> Result<Status, BoxError> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.outcome_since(seq) {
                return Ok(status);
            }
            if let Ok(Some(exit)) = self.child.try_wait() {
                return Err(format!("the server exited ({exit}) during the upgrade").into());
            }
            if Instant::now() > deadline {
                return Err("timed out waiting for the upgrade's outcome".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn mark(&self) -> usize {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn wait(
        &mut self,
        mark: usize,
        pattern: &str,
        limit: Duration,
    ) -> Result<String, BoxError> {
        let deadline = Instant::now() + limit;
        loop {
            let found = self
                .log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .skip(mark)
                .find(|l| l.contains(pattern))
                .cloned();
            if let Some(l) = found {
                return Ok(l);
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

    pub fn lines_since(&self, mark: usize) -> Vec<String> {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .skip(mark)
            .cloned()
            .collect()
    }

    pub fn signal(&self, sig: Signal) -> Result<(), BoxError> {
        kill(Pid::from_raw(self.child.id() as i32), sig)?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.status_dir);
    }
}

/// `key=value` from a log line, as a number.
pub fn field(lines: &[String], marker: &str, key: &str) -> Option<f64> {
    let line = lines.iter().find(|l| l.contains(marker))?;
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split_whitespace().next()?.parse().ok()
}
