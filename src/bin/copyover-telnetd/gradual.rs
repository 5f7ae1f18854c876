//! A gradual migration in the demo: the shared part handed over (the
//! users' variables, the listener), users moved a batch at a time with
//! their connection's state, and chat lines and who is online forwarded
//! between the two processes meanwhile.

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::os::fd::AsFd;

use copyover::migration::Batch;
use copyover::{Handoff, Progress};
use nix::sys::epoll::{EpollEvent, EpollFlags};
use serde::{Deserialize, Serialize};

use crate::chat::{Chat, Moving, User};
use crate::{LISTENER, Server, TOKEN_LISTENER};

/// What one process of the demo forwards to the other.
#[derive(Debug, Serialize, Deserialize)]
enum Relay {
    /// A chat line said there, for every user here.
    Line(String),
    /// A user's variables as they were when the user left there (without
    /// moving): the newer ones.
    Saved(String, User),
    /// Who is online there now, by login.
    Online(Vec<(u64, String)>),
}

impl Server {
    /// `Event::ShareApproved`: hands the new process what both need (the
    /// users' variables, the listener), then stops accepting: it accepts.
    pub(crate) fn share(&mut self) {
        if self.tls.is_some() {
            // A TLS session crosses only a whole upgrade or migration here.
            self.co
                .abandon("this demo moves TLS sessions only in a whole migration (kill -USR2 without --batch)");
            return;
        }
        let shared = Chat {
            next_id: self.chat.next_id,
            next_login: self.chat.next_login,
            users: self.chat.users.clone(),
            ..Chat::default()
        };
        let mut keep = Handoff::new();
        keep.listener(LISTENER, &self.listener);
        // Anything else is a refusal: the runtime reported it, and
        // everyone stays.
        if let Ok(Progress::Sharing { with }) = self.co.upgrade(&shared, &keep) {
            tracing::info!(
                with,
                users = self.streams.len(),
                "gradual migration: process {with} accepts from now on"
            );
            self.set_accepting(false);
            self.chat.relay = Some(Vec::new());
            self.online_sent = None;
            self.online_mark = None;
        }
    }

    /// `Event::MoveUsers`: the `most` oldest connections go, each with
    /// its state and variables; none left ends the migration (and this
    /// process).
    pub(crate) fn move_users(&mut self, most: usize) {
        let ids: Vec<u64> = self
            .streams
            .keys()
            .copied()
            .collect::<BTreeSet<u64>>()
            .into_iter()
            .take(most)
            .collect();
        let records: Vec<(u64, Moving)> = ids
            .iter()
            .filter_map(|id| Some((*id, self.chat.moving(*id)?)))
            .collect();
        // A process moving its users accepts no more (the other one does).
        self.set_accepting(false);
        let mut batch = Batch::new();
        let mut moving = Vec::with_capacity(records.len());
        for (id, record) in &records {
            let Some((stream, _)) = self.streams.get(id) else {
                continue;
            };
            match batch.user(record, &[stream.as_fd()]) {
                Ok(_) => moving.push(*id),
                Err(e) => tracing::warn!(conn = id, "not moving this user: {e}"),
            }
        }
        if crate::FAULT == Some("slow-batch") && !batch.is_empty() {
            // The window in which the other process's forwarded messages
            // queue up here, unread, while a batch is made.
            tracing::warn!("fault build: sleeping 300 ms before moving the batch");
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        if batch.is_empty() && !self.streams.is_empty() {
            // Users are left whose records could not be made: an empty
            // batch would end the migration (and this process) without
            // them. The next batch tries again.
            tracing::warn!(
                left = self.streams.len(),
                "no user could be moved in this batch"
            );
            return;
        }
        // With no user left, this does not return.
        match self.co.move_users(&batch) {
            Ok(moved) => {
                for id in moving {
                    self.release(id);
                }
                tracing::info!(moved, left = self.streams.len(), "moved a batch of users");
            }
            Err(e) => tracing::warn!("the batch stays here: {e}"),
        }
        self.relay_online();
    }

    /// A connection now served by the other process: our copy closes
    /// quietly (no shutdown: the socket is the other process's).
    fn release(&mut self, id: u64) {
        if let Some((s, _)) = self.streams.remove(&id) {
            let _ = self.epoll.delete(&s);
            self.co.unstore_fd(&format!("conn:{id}"));
        }
        self.chat.conns.remove(&id);
    }

    /// `Event::UsersArrived`: they are ours; what was said here before
    /// they came, which they missed, is delivered to them.
    pub(crate) fn take_users(&mut self) {
        if crate::FAULT == Some("slow-take") {
            // The window in which the sender waits for `took`.
            tracing::warn!("fault build: sleeping 3 s before taking the users");
            std::thread::sleep(std::time::Duration::from_secs(3));
        }
        let arrived = match self.co.take_users::<Moving>() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("a batch did not come: {e}");
                return;
            }
        };
        let mut dirty = BTreeSet::new();
        let mut here = Vec::new();
        for (moving, fds) in arrived.users {
            let Some(fd) = fds.into_iter().next() else {
                continue;
            };
            let id = self.chat.arrive(moving);
            let stream = TcpStream::from(fd);
            let _ = self.co.store_fd(&format!("conn:{id}"), stream.as_fd());
            // Ours now: a registration that fails is tried again (see
            // `register_late`), never a reason to drop the user.
            if let Err(e) = self
                .epoll
                .add(&stream, EpollEvent::new(EpollFlags::EPOLLIN, id))
            {
                tracing::warn!(
                    conn = id,
                    "could not register a user that arrived ({e}); trying again"
                );
                self.unregistered.push(id);
            }
            self.streams.insert(id, (stream, false));
            dirty.insert(id);
            here.push(id);
        }
        for m in arrived.missed {
            if let Ok(Relay::Line(line)) = postcard::from_bytes::<Relay>(&m) {
                for id in &here {
                    if let Some(c) = self.chat.conns.get_mut(id)
                        && c.name.is_some()
                        && !c.closing
                    {
                        c.out.extend_from_slice(line.as_bytes());
                    }
                }
            }
        }
        tracing::info!(users = here.len(), "users arrived");
        self.flush(dirty);
        self.relay_online();
    }

    /// `Event::Forwarded`.
    pub(crate) fn forwarded(&mut self, m: &[u8]) {
        match postcard::from_bytes::<Relay>(m) {
            Ok(Relay::Line(line)) => {
                let mut dirty = BTreeSet::new();
                self.chat.deliver(&line, None, &mut dirty);
                self.flush(dirty);
            }
            Ok(Relay::Online(online)) => self.chat.remote = online,
            Ok(Relay::Saved(name, user)) => {
                self.chat.users.insert(name, user);
            }
            Err(e) => tracing::warn!("an unreadable message from the other process: {e}"),
        }
    }

    /// `Event::MigrationEnded`: this process serves alone, and accepts.
    pub(crate) fn migration_ended(&mut self) {
        self.chat.remote.clear();
        self.chat.relay = None;
        self.set_accepting(true);
    }

    /// Forwards what the other process needs of the last events: lines
    /// said here, and who is online here when that changed.
    pub(crate) fn relay(&mut self) {
        let Some(lines) = self.chat.relay.as_mut().map(std::mem::take) else {
            return;
        };
        for line in lines {
            self.send_relay(&Relay::Line(line));
        }
        self.relay_online();
    }

    fn relay_online(&mut self) {
        if self.co.sharing_with().is_none() {
            return;
        }
        // Who is online changes only with a login (a new login number) or
        // a connection coming or going: the list is made only then.
        let mark = (self.chat.conns.len(), self.chat.next_login);
        if self.online_mark == Some(mark) {
            return;
        }
        self.online_mark = Some(mark);
        let online = self.chat.online();
        if self.online_sent.as_ref() != Some(&online) {
            self.send_relay(&Relay::Online(online.clone()));
            self.online_sent = Some(online);
        }
    }

    fn send_relay(&mut self, relay: &Relay) {
        let sent = postcard::to_allocvec(relay)
            .map_err(|e| e.to_string())
            .and_then(|bytes| self.co.forward(&bytes).map_err(|e| e.to_string()));
        if let Err(e) = sent {
            tracing::warn!("could not forward to the other process: {e}");
        }
    }

    /// A named user leaves this process for good (not by a move): the
    /// other process gets their variables, which may be newer than its own.
    pub(crate) fn relay_departure(&mut self, id: u64) {
        if self.chat.relay.is_none() {
            return;
        }
        let Some(name) = self.chat.conns.get(&id).and_then(|c| c.name.clone()) else {
            return;
        };
        if let Some(user) = self.chat.users.get(&name).cloned() {
            self.send_relay(&Relay::Saved(name, user));
        }
    }

    /// Registers the users whose registration failed as they arrived;
    /// whether some are still waiting. A user that still cannot be
    /// registered after 500 tries (10 s) is told so and let go: it would
    /// never be served.
    pub(crate) fn register_late(&mut self) -> bool {
        self.late_tries += 1;
        let give_up = self.late_tries > 500;
        let waiting = std::mem::take(&mut self.unregistered);
        for id in waiting {
            let Some((stream, _)) = self.streams.get_mut(&id) else {
                continue;
            };
            if give_up {
                tracing::error!(
                    conn = id,
                    "a user that arrived could not be registered for 10 s; letting it go"
                );
                let _ = std::io::Write::write_all(
                    stream,
                    b"\r\nThe server cannot serve you here; please reconnect.\r\n",
                );
                self.close(id);
                continue;
            }
            match self
                .epoll
                .add(&*stream, EpollEvent::new(EpollFlags::EPOLLIN, id))
            {
                // Its input, which came meanwhile, is read at once.
                Ok(()) => {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut dirty = BTreeSet::new();
                    self.read(id, &mut buf, &mut dirty);
                    self.flush(dirty);
                }
                Err(_) => self.unregistered.push(id),
            }
        }
        if self.unregistered.is_empty() {
            self.late_tries = 0;
        }
        !self.unregistered.is_empty()
    }

    /// Whether the listener is in the epoll set.
    fn set_accepting(&mut self, on: bool) {
        if on == self.accepting {
            return;
        }
        let done = if on {
            self.epoll.add(
                &self.listener,
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_LISTENER),
            )
        } else {
            self.epoll.delete(&self.listener)
        };
        match done {
            Ok(()) => self.accepting = on,
            Err(e) => tracing::warn!(on, "could not change whether this process accepts: {e}"),
        }
    }
}
