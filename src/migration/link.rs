//! The way between the two processes of a gradual migration once both
//! serve ([`Link`]): the socket pair of the hand-over, read by a thread of
//! its own into a queue the event loop takes from, and the messages on it
//! (see the [protocol](super#a-gradual-migration)).

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{FAIL, FDS, MAX_MESSAGE};
use crate::sys;

/// A batch of users: their records (encoded by the sender) and descriptors.
pub(super) const USERS: &str = "users";
/// The receiver holds a batch and waits for the sender's decision.
pub(super) const TOOK: &[u8] = b"took";
/// The sender's decision: the batch is the receiver's.
pub(super) const YOURS: &[u8] = b"yours";
/// The sender's decision: the sender keeps the batch.
pub(super) const MINE: &[u8] = b"mine";
/// An application message; the bytes follow the word and a space.
pub(super) const FWD: &str = "fwd ";
/// How many forwarded messages the application took, so far.
pub(super) const ACK: &str = "ack ";
/// The old process asks the new one to move everyone back.
pub(super) const BACK: &str = "back";
/// The sender of this has no users left and exits.
pub(super) const DONE: &[u8] = b"done";
/// The new process joined the old one's process group.
pub(super) const JOINED: &[u8] = super::JOINED;

/// The longest message the application may forward.
pub const MAX_FORWARD: usize = 60 * 1024;
/// The receive buffer: a forwarded message and its word.
const BUFFER: usize = MAX_FORWARD + 64;

/// One message from the other process, as the reader thread queued it.
#[derive(Debug)]
pub(super) enum Incoming {
    /// A batch: the records' bytes, how many forwarded messages the sender
    /// had taken when it made it, and every descriptor of the batch.
    Users {
        seen: u64,
        records: Vec<u8>,
        fds: Vec<OwnedFd>,
        /// When its first message came (monotonic ns).
        came_ns: u64,
    },
    Took,
    Yours,
    Mine,
    Fail(String),
    /// A batch that could not be received whole: why. The receiver
    /// refuses it at once; the sender keeps it.
    Refused(String),
    Forwarded(Vec<u8>),
    Ack(u64),
    Back {
        batch: usize,
        every: Duration,
    },
    Done,
    Joined,
    /// The socket ended (the other process is gone), or it could not be
    /// read: why.
    End(String),
}

/// The socket, the queue its reader thread fills, and the moment the
/// next batch is due (the reader wakes the loop then).
#[derive(Debug)]
pub(crate) struct Link {
    sock: OwnedFd,
    queue: Mutex<VecDeque<Incoming>>,
    arrived: Condvar,
    /// When the loop wants to be woken for a batch (`CLOCK_MONOTONIC` ns;
    /// 0: never).
    tick_at: std::sync::atomic::AtomicU64,
    /// The socket ended: the reader thread is gone.
    ended: AtomicBool,
}

impl Link {
    /// Starts reading `sock` on a thread of its own; `wake` wakes the
    /// event loop when a message is queued or a batch is due.
    pub(super) fn start(sock: OwnedFd, wake: Arc<OwnedFd>) -> std::io::Result<Arc<Link>> {
        let link = Arc::new(Link {
            sock,
            queue: Mutex::new(VecDeque::new()),
            arrived: Condvar::new(),
            tick_at: std::sync::atomic::AtomicU64::new(0),
            ended: AtomicBool::new(false),
        });
        let reader = Arc::clone(&link);
        std::thread::Builder::new()
            .name("copyover-link".into())
            .spawn(move || reader.read_all(&wake))?;
        Ok(link)
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Incoming>> {
        // Only pushes and pops happen under it: a panic leaves it whole.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The reader thread: every message into the queue, until the end.
    fn read_all(&self, wake: &OwnedFd) {
        let mut buf = vec![0u8; BUFFER];
        loop {
            let due = self.tick_at.load(Ordering::SeqCst);
            let now = sys::monotonic_ns();
            if due != 0 && now >= due {
                self.tick_at.store(0, Ordering::SeqCst);
                crate::signal::wake(wake);
            }
            let wait = match self.tick_at.load(Ordering::SeqCst) {
                0 => Duration::from_millis(100),
                at => Duration::from_nanos(at.saturating_sub(now)).min(Duration::from_millis(100)),
            };
            match sys::wait_readable(self.sock.as_fd(), wait.max(Duration::from_millis(1))) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => {
                    self.push(
                        Incoming::End(format!("could not wait on the link: {e}")),
                        wake,
                    );
                    return;
                }
            }
            let message = self.read_one(&mut buf);
            let end = matches!(message, Incoming::End(_));
            self.push(message, wake);
            if end {
                return;
            }
        }
    }

    fn push(&self, message: Incoming, wake: &OwnedFd) {
        if matches!(message, Incoming::End(_)) {
            self.ended.store(true, Ordering::SeqCst);
        }
        self.queue().push_back(message);
        self.arrived.notify_all();
        crate::signal::wake(wake);
    }

    /// Reads one message (a batch: with its descriptors, which follow in
    /// `fds` messages).
    fn read_one(&self, buf: &mut [u8]) -> Incoming {
        let mut fds = Vec::new();
        let n = match sys::recv_message(self.sock.as_fd(), buf, &mut fds) {
            Ok(n) => n,
            Err(e) => return Incoming::End(format!("could not read the link: {e}")),
        };
        if n == 0 && fds.is_empty() {
            return Incoming::End("the other process closed the link".into());
        }
        let m = &buf[..n];
        let text = String::from_utf8_lossy(m);
        match m {
            m if m == TOOK => return Incoming::Took,
            m if m == YOURS => return Incoming::Yours,
            m if m == MINE => return Incoming::Mine,
            m if m == DONE => return Incoming::Done,
            m if m == JOINED => return Incoming::Joined,
            _ => {}
        }
        if let Some(bytes) = m.strip_prefix(FWD.as_bytes()) {
            return Incoming::Forwarded(bytes.to_vec());
        }
        if let Some(reason) = text.strip_prefix(FAIL) {
            return Incoming::Fail(reason.to_owned());
        }
        if let Some(n) = text.strip_prefix(ACK).and_then(|n| n.parse().ok()) {
            return Incoming::Ack(n);
        }
        if let Some(rest) = text.strip_prefix(BACK) {
            let mut words = rest.split_whitespace().map(|w| w.parse::<u64>().ok());
            return match (words.next().flatten(), words.next().flatten()) {
                (Some(batch), Some(ms)) => Incoming::Back {
                    batch: batch.max(1) as usize,
                    every: Duration::from_millis(ms),
                },
                _ => Incoming::End(format!("a malformed message {text:?}")),
            };
        }
        if let Some(rest) = text.strip_prefix(USERS) {
            return match parse_users(rest) {
                Some((count, seen)) => self.read_batch(count, seen, fds, buf),
                None => Incoming::End(format!("a malformed message {text:?}")),
            };
        }
        Incoming::End(format!("an unknown message {text:?}"))
    }

    /// The rest of a batch: the records' memfd came with `users`; `count`
    /// descriptors follow.
    fn read_batch(&self, count: usize, seen: u64, first: Vec<OwnedFd>, buf: &mut [u8]) -> Incoming {
        let Ok([records]) = <[OwnedFd; 1]>::try_from(first) else {
            return Incoming::End("a batch came without its records".into());
        };
        let came_ns = sys::monotonic_ns();
        let records = match read_records(&records) {
            Ok(r) => r,
            Err(e) => return Incoming::End(format!("could not read a batch's records: {e}")),
        };
        let mut fds = Vec::with_capacity(count);
        // The sender sends them `MAX_FDS_PER_MESSAGE` at a time: a message
        // whose descriptors did not fit here (`MSG_CTRUNC`: this process's
        // `RLIMIT_NOFILE`) is counted as that many, the rest still read, and
        // the batch refused as a whole (the sender keeps it).
        let mut lost = 0;
        let mut why = None;
        while fds.len() + lost < count {
            let expected = (count - fds.len() - lost).min(sys::MAX_FDS_PER_MESSAGE);
            match sys::recv_message(self.sock.as_fd(), buf, &mut fds) {
                Ok(n) if &buf[..n] == FDS => {}
                Ok(_) => {
                    return Incoming::End(format!(
                        "a batch ended after {} of its {count} descriptors",
                        fds.len() + lost
                    ));
                }
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    lost += expected;
                    why.get_or_insert_with(|| e.to_string());
                }
                Err(e) => {
                    return Incoming::End(format!(
                        "could not receive a batch's descriptors ({} of {count} came): {e}",
                        fds.len()
                    ));
                }
            }
        }
        if let Some(why) = why {
            return Incoming::Refused(format!(
                "{lost} of the batch's {count} descriptors could not be received here ({why})"
            ));
        }
        Incoming::Users {
            seen,
            records,
            fds,
            came_ns,
        }
    }

    /// Sends one message.
    pub(super) fn send(&self, message: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        sys::send_message(self.sock.as_fd(), message, fds)
    }

    /// Sends a batch: the records in a sealed memfd, then the descriptors.
    pub(super) fn send_batch(
        &self,
        seen: u64,
        records: &[u8],
        fds: &[RawFd],
    ) -> std::io::Result<()> {
        let memfd = write_records(records)?;
        let first = format!("{USERS} {} {seen}", fds.len());
        self.send(first.as_bytes(), &[memfd.as_raw_fd()])?;
        drop(memfd);
        fds.chunks(sys::MAX_FDS_PER_MESSAGE)
            .try_for_each(|chunk| self.send(FDS, chunk))
    }

    /// Takes the first queued message, in order.
    pub(super) fn next(&self) -> Option<Incoming> {
        self.queue().pop_front()
    }

    /// Waits until `deadline` for the first queued message that `wanted`
    /// picks (an end too) and takes it; the others stay queued, in order.
    /// `None` when the time ran out.
    pub(super) fn wait_for(
        &self,
        deadline: Instant,
        wanted: impl Fn(&Incoming) -> bool,
    ) -> Option<Incoming> {
        let mut queue = self.queue();
        loop {
            if let Some(at) = queue
                .iter()
                .position(|m| wanted(m) || matches!(m, Incoming::End(_)))
            {
                return queue.remove(at);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            queue = self
                .arrived
                .wait_timeout(queue, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Asks the reader thread to wake the loop at `at` (monotonic ns).
    pub(super) fn wake_at(&self, at: u64) {
        self.tick_at.store(at.max(1), Ordering::SeqCst);
    }

    /// Whether the socket ended.
    pub(super) fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Ends the link from this side: the reader thread sees the end (and
    /// the other process too, once this one's copies are closed).
    pub(super) fn close(&self) {
        let _ = sys::shutdown(self.sock.as_fd());
    }
}

/// `users COUNT SEEN`.
fn parse_users(rest: &str) -> Option<(usize, u64)> {
    let mut words = rest.split_whitespace();
    let count = words.next()?.parse().ok()?;
    let seen = words.next()?.parse().ok()?;
    words.next().is_none().then_some((count, seen))
}

/// The records of a batch, in a memfd sealed against every change.
fn write_records(records: &[u8]) -> std::io::Result<OwnedFd> {
    let fd = sys::memfd_create(c"copyover-batch")?;
    let mut file = std::fs::File::from(fd);
    file.write_all(records)?;
    sys::seal(file, &sys::SEALS)
}

/// The records a batch's sealed memfd holds.
fn read_records(fd: &OwnedFd) -> std::io::Result<Vec<u8>> {
    let sealed = sys::check_sealed(fd.as_fd())?;
    let len = sys::file_size(sealed.fd())?;
    let len = usize::try_from(len).map_err(|_| std::io::Error::other("a batch too large"))?;
    let mut bytes = vec![0u8; len];
    let mut at = 0;
    while at < len {
        match sys::read_at(sealed.fd(), &mut bytes[at..], at as u64)? {
            0 => return Err(std::io::Error::other("the batch's memfd ended early")),
            n => at += n,
        }
    }
    Ok(bytes)
}

/// A `fail REASON` for the other process, cut to a message.
pub(super) fn fail_message(reason: &str) -> Vec<u8> {
    let mut bytes = format!("{FAIL}{reason}").into_bytes();
    bytes.truncate(MAX_MESSAGE);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Arc<Link>, Arc<Link>, OwnedFd) {
        let (a, b) = sys::seqpacket_pair().unwrap();
        let (rx, tx) = sys::wake_pair().unwrap();
        let tx = Arc::new(tx);
        (
            Link::start(a, Arc::clone(&tx)).unwrap(),
            Link::start(b, tx).unwrap(),
            rx,
        )
    }

    fn wait(link: &Link) -> Incoming {
        link.wait_for(Instant::now() + Duration::from_secs(5), |_| true)
            .expect("a message within 5 s")
    }

    #[test]
    fn a_batch_crosses_with_its_records_and_descriptors() {
        let (a, b, _rx) = pair();
        let files: Vec<OwnedFd> = (0..300)
            .map(|_| OwnedFd::from(std::fs::File::open("/dev/null").unwrap()))
            .collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        a.send_batch(7, b"the records", &raw).unwrap();
        match wait(&b) {
            Incoming::Users {
                seen, records, fds, ..
            } => {
                assert_eq!(seen, 7);
                assert_eq!(records, b"the records");
                assert_eq!(fds.len(), 300);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_words_read_back_and_the_end_is_seen() {
        let (a, b, _rx) = pair();
        for m in [
            TOOK,
            YOURS,
            MINE,
            DONE,
            JOINED,
            b"fwd hello",
            b"ack 12",
            b"back 3 250",
        ] {
            a.send(m, &[]).unwrap();
        }
        a.send(&fail_message("no"), &[]).unwrap();
        let got: Vec<String> = (0..9).map(|_| format!("{:?}", wait(&b))).collect();
        assert_eq!(
            got,
            [
                "Took",
                "Yours",
                "Mine",
                "Done",
                "Joined",
                "Forwarded([104, 101, 108, 108, 111])",
                "Ack(12)",
                "Back { batch: 3, every: 250ms }",
                "Fail(\"no\")"
            ]
        );
        // A malformed message ends the link.
        let (c, d, _rx2) = pair();
        c.send(b"users x", &[]).unwrap();
        assert!(matches!(wait(&d), Incoming::End(_)));
        assert!(d.ended());
    }

    #[test]
    fn waiting_for_one_message_leaves_the_others_in_order() {
        let (a, b, _rx) = pair();
        a.send(b"fwd 1", &[]).unwrap();
        a.send(b"fwd 2", &[]).unwrap();
        a.send(TOOK, &[]).unwrap();
        let took = b.wait_for(Instant::now() + Duration::from_secs(5), |m| {
            matches!(m, Incoming::Took)
        });
        assert!(matches!(took, Some(Incoming::Took)));
        assert!(matches!(b.next(), Some(Incoming::Forwarded(m)) if m == b"1"));
        assert!(matches!(b.next(), Some(Incoming::Forwarded(m)) if m == b"2"));
        assert!(
            b.wait_for(Instant::now() + Duration::from_millis(20), |_| true)
                .is_none()
        );
    }
}
