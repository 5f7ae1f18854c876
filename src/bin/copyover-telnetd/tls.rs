//! The chat over TLS, beside plain telnet: one chat, so TLS and plain users
//! talk to each other. Each TLS connection's session crosses an upgrade
//! with `copyover::tls`; its socket crosses as `tls:ID`, the sessions in a
//! sealed memfd of their own (`tls-sessions`), never in the chat's state.

use std::collections::{BTreeSet, HashMap};
use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use copyover::Handoff;
use copyover::tls::{Carried, Carry, Config, Connection};
use nix::sys::epoll::{EpollEvent, EpollFlags};

use crate::{BoxError, Server};

pub const LISTENER: &str = "listener:tls";
/// The TLS connections' prefix in the handoff: `tls:ID`.
pub const CONN: &str = "tls";
/// The sealed memfd of the sessions.
pub const SESSIONS: &str = "tls-sessions";
/// How long an approved upgrade waits for handshakes under way to end (a
/// handshake between the server's answer and its end cannot cross).
const HANDSHAKE_WAIT: Duration = Duration::from_secs(2);

/// The TLS side of the server.
pub struct Tls {
    pub config: Config,
    pub listener: TcpListener,
    pub conns: HashMap<u64, Connection>,
    /// An approved upgrade waits for handshakes to end until then.
    pub commit_by: Option<Instant>,
}

impl Tls {
    /// The TLS listener, and the sessions of the connections a previous
    /// image handed over (`streams`: its `tls:ID` sockets).
    pub fn resume(
        config: Config,
        listener: TcpListener,
        carried: &mut Carried,
        streams: &[u64],
    ) -> Result<Tls, BoxError> {
        let mut conns = HashMap::with_capacity(streams.len());
        for &id in streams {
            let conn = carried
                .restore(id, &config)?
                .ok_or_else(|| format!("TLS connection {id} came without its session"))?;
            conns.insert(id, conn);
        }
        Ok(Tls {
            config,
            listener,
            conns,
            commit_by: None,
        })
    }

    /// The listener and the TLS sockets, for the handoff.
    pub fn keep<'a>(
        &'a self,
        keep: &mut Handoff<'a>,
        streams: &'a HashMap<u64, (TcpStream, bool)>,
    ) {
        keep.listener(LISTENER, &self.listener).streams(
            CONN,
            self.conns
                .keys()
                .filter_map(|id| streams.get(id).map(|(s, _)| (*id, s))),
        );
    }
}

impl Server {
    /// Accepts TLS clients: a handshake starts; the greeting is queued
    /// until it ends.
    pub fn accept_tls(&mut self, dirty: &mut BTreeSet<u64>) {
        let Some(tls) = self.tls.as_mut() else { return };
        loop {
            let stream = match tls.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    return;
                }
            };
            let mut conn = match Connection::accept(&tls.config) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("dropping a new TLS connection: {e}");
                    continue;
                }
            };
            // An upgrade waits for handshakes to end: this one waits for
            // the next image.
            conn.hold(tls.commit_by.is_some());
            if let Err(e) = stream.set_nonblocking(true) {
                tracing::warn!("dropping a new TLS connection: {e}");
                continue;
            }
            let id = self.chat.connect(crate::LABEL);
            // Not in systemd's fd store: a session's keys and numbers live
            // in this process, so a TLS connection does not survive a crash.
            if let Err(e) = self
                .epoll
                .add(&stream, EpollEvent::new(EpollFlags::EPOLLIN, id))
            {
                tracing::warn!("dropping a new TLS connection: {e}");
                self.chat.conns.remove(&id);
                continue;
            }
            tls.conns.insert(id, conn);
            self.streams.insert(id, (stream, false));
            dirty.insert(id);
        }
    }

    /// Reads a TLS client: returns false once the connection is to close.
    pub fn read_tls(&mut self, id: u64, plain: &mut Vec<u8>) -> bool {
        let (Some(tls), Some((stream, _))) = (self.tls.as_mut(), self.streams.get_mut(&id)) else {
            return false;
        };
        let Some(conn) = tls.conns.get_mut(&id) else {
            return false;
        };
        for _ in 0..16 {
            match conn.read_tls(stream) {
                Ok(0) => {
                    tracing::debug!(conn = id, "a TLS client hung up");
                    return false;
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::info!(conn = id, "closing a TLS connection: {e}");
                    return false;
                }
            }
            if let Err(e) = conn.process(plain) {
                tracing::info!(conn = id, "closing a TLS connection: {e}");
                // The alert, at best effort.
                let _ = conn.write_tls(stream);
                return false;
            }
        }
        !conn.peer_closed()
    }

    /// Seals connection `id`'s pending output and writes what the socket
    /// takes. Returns whether output is still pending, or `None` if the
    /// connection failed.
    pub fn flush_tls(&mut self, id: u64, out: &mut Vec<u8>, closing: bool) -> Option<bool> {
        let tls = self.tls.as_mut()?;
        let conn = tls.conns.get_mut(&id)?;
        let (stream, _) = self.streams.get_mut(&id)?;
        if !out.is_empty() {
            if let Err(e) = conn.write(out) {
                tracing::info!(conn = id, "closing a TLS connection: {e}");
                return None;
            }
            out.clear();
        }
        if closing {
            conn.close();
        }
        while conn.wants_write() {
            match conn.write_tls(stream) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Some(true),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(conn = id, "writing to a TLS client failed: {e}");
                    return None;
                }
            }
        }
        Some(false)
    }

    /// Processes the TLS connections `which` picks without a socket event:
    /// a restored one after `ready` (a hello to answer, queued output), a
    /// held hello once released. Returns the connections with output.
    pub fn process_tls(&mut self, which: fn(&Connection) -> bool) -> BTreeSet<u64> {
        let mut dirty = BTreeSet::new();
        let Some(tls) = self.tls.as_mut() else {
            return dirty;
        };
        let ids: Vec<u64> = tls
            .conns
            .iter()
            .filter(|(_, c)| which(c))
            .map(|(id, _)| *id)
            .collect();
        let version = self.version_line();
        let mut failed = Vec::new();
        for id in ids {
            let Some(conn) = self.tls.as_mut().and_then(|t| t.conns.get_mut(&id)) else {
                continue;
            };
            let mut plain = Vec::new();
            if let Err(e) = conn.process(&mut plain) {
                tracing::info!(conn = id, "closing a TLS connection: {e}");
                failed.push(id);
            }
            dirty.insert(id);
            if !plain.is_empty() {
                self.chat.input(id, &plain, &version, &mut dirty);
            }
        }
        for id in failed {
            self.close(id);
        }
        dirty
    }

    /// Commits an approved upgrade once every TLS connection can cross:
    /// returns false while it waits for handshakes under way (new ones are
    /// held meanwhile), true once the upgrade was tried or abandoned. A
    /// handshake still under way at the deadline is closed (its client is
    /// not in the chat yet, and reconnects): one client that never ends
    /// its handshake must not hold every upgrade off.
    pub fn commit(&mut self) -> bool {
        if let Some(tls) = self.tls.as_mut() {
            let busy: Vec<u64> = tls
                .conns
                .iter()
                .filter(|(_, c)| !c.can_cross())
                .map(|(id, _)| *id)
                .collect();
            if !busy.is_empty() {
                let by = *tls
                    .commit_by
                    .get_or_insert_with(|| Instant::now() + HANDSHAKE_WAIT);
                if Instant::now() < by {
                    let first = !tls.conns.values().any(|c| c.is_held());
                    for conn in tls.conns.values_mut() {
                        conn.hold(true);
                    }
                    if first {
                        tracing::info!(
                            handshakes = busy.len(),
                            "the upgrade waits for TLS handshakes under way to end; new ones are held"
                        );
                    }
                    return false;
                }
                tracing::warn!(
                    connections = busy.len(),
                    "closing TLS connections whose handshake did not end within {} s, so that the upgrade can go on",
                    HANDSHAKE_WAIT.as_secs()
                );
                for id in busy {
                    self.close(id);
                }
            }
        }
        let mut carry = Carry::new();
        let sessions = match self.tls.as_ref().map(|tls| {
            for (id, conn) in &tls.conns {
                carry.add(*id, conn)?;
            }
            carry.seal()
        }) {
            None => None,
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                self.co
                    .abandon(&format!("the TLS sessions cannot cross: {e}"));
                self.release_tls();
                return true;
            }
        };
        let mut keep = crate::handoff(
            &self.listener,
            &self.epoll,
            &self.streams,
            self.tls.as_ref(),
        );
        if let Some(s) = &sessions {
            keep.other(SESSIONS, s);
        }
        // Returns only if the commit failed (the runtime logs why); every
        // connection goes on here.
        let _ = self.co.upgrade(&self.chat, &keep);
        drop(keep);
        self.release_tls();
        true
    }

    /// Ends the wait: held hellos are answered now (their clients, waiting
    /// for the answer, send nothing that would wake the loop).
    fn release_tls(&mut self) {
        let Some(tls) = self.tls.as_mut() else { return };
        tls.commit_by = None;
        for conn in tls.conns.values_mut() {
            conn.hold(false);
        }
        let dirty = self.process_tls(Connection::is_handshaking);
        self.flush(dirty);
    }
}
