//! The harness shared by `run` and `soak`: a server process started with
//! its log collected, waited on by log line, signalled, and killed on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::BoxError;

/// A running bench server and its log.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
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
    }
}

/// `key=value` from a log line, as a number.
pub fn field(lines: &[String], marker: &str, key: &str) -> Option<f64> {
    let line = lines.iter().find(|l| l.contains(marker))?;
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split_whitespace().next()?.parse().ok()
}
