//! The way between the two processes of a gradual migration once both
//! serve ([`Link`]): the socket pair of the hand-over, read by a thread of
//! its own into a queue the event loop takes from, and the messages on it
//! (see the protocol in the module docs of `migration`).

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{FDS, MAX_MESSAGE};
use crate::sys;

/// A batch of users: `users ID COUNT SEEN`, with their records (encoded by
/// the sender, in a sealed memfd); COUNT descriptors follow in `fds`
/// messages.
pub(super) const USERS: &str = "users ";
/// `took ID`: the receiver holds batch ID and waits for the decision.
pub(super) const TOOK: &str = "took ";
/// `yours ID`: the sender's decision, batch ID is the receiver's.
pub(super) const YOURS: &str = "yours ";
/// `mine ID`: the sender's decision, it keeps batch ID.
pub(super) const MINE: &str = "mine ";
/// `refused ID REASON`: the receiver cannot take batch ID; the sender
/// keeps it.
pub(super) const REFUSED: &str = "refused ";
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

/// The longest one send waits for the other process to read.
const SEND_LIMIT: Duration = Duration::from_secs(5);

/// How many failures in a row end the link, and the pause between tries.
const PERSISTENT: u32 = 50;
const RETRY: Duration = Duration::from_millis(20);

/// The longest message the application may forward.
pub const MAX_FORWARD: usize = 60 * 1024;
/// The receive buffer: a forwarded message and its word.
const BUFFER: usize = MAX_FORWARD + 64;
/// The most descriptors, and record bytes, one batch may announce: more is
/// a garbled message, not a batch.
const MAX_BATCH_FDS: usize = 1 << 20;
const MAX_RECORDS: u64 = 1 << 30;

/// One message from the other process, as the reader thread queued it.
#[derive(Debug)]
pub(super) enum Incoming {
    /// A whole batch.
    Users(Received),
    Took(u64),
    Yours(u64),
    Mine(u64),
    /// The other process refused batch `id`, and why.
    Refused(u64, String),
    /// Batch `id` could not be received whole here (its descriptors did
    /// not fit): to refuse at once.
    Unreceived(u64, String),
    Forwarded(Vec<u8>),
    Ack(u64),
    Back {
        batch: usize,
        every: Duration,
    },
    Done,
    Joined,
    /// A batch's `fds` message outside a batch (what is left of one whose
    /// first message was lost): dropped by the reader.
    Batched,
    /// The socket ended (the other process is gone), or it could not be
    /// read: why.
    End(String),
}

/// Batch `id` as it came: the records' bytes, how many forwarded messages
/// the sender had taken when it made it, and every descriptor of it.
#[derive(Debug)]
pub(super) struct Received {
    pub(super) id: u64,
    pub(super) seen: u64,
    pub(super) records: Vec<u8>,
    pub(super) fds: Vec<OwnedFd>,
    /// When its first message came (monotonic ns).
    pub(super) came_ns: u64,
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
    tick_at: AtomicU64,
    /// The socket ended: the reader thread is gone.
    ended: AtomicBool,
}

impl Link {
    /// Starts reading `sock` on a thread of its own; `wake` wakes the
    /// event loop when a message is queued or a batch is due.
    pub(super) fn start(sock: OwnedFd, wake: Arc<OwnedFd>) -> std::io::Result<Arc<Link>> {
        sys::set_send_timeout(sock.as_fd(), SEND_LIMIT)?;
        let link = Arc::new(Link {
            sock,
            queue: Mutex::new(VecDeque::new()),
            arrived: Condvar::new(),
            tick_at: AtomicU64::new(0),
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

    /// The reader thread: every message into the queue, until the end. A
    /// panic here (a bug) ends the link as its end would.
    fn read_all(&self, wake: &OwnedFd) {
        let read = std::panic::AssertUnwindSafe(|| self.read_until_end(wake));
        if std::panic::catch_unwind(read).is_err() {
            self.push(Incoming::End("the link's reader panicked".into()), wake);
        }
    }

    fn read_until_end(&self, wake: &OwnedFd) {
        let mut buf = vec![0u8; BUFFER];
        // Consecutive failures to wait or to read: one is a passing error
        // (`ENOMEM`, say) and is tried again; [`PERSISTENT`] in a row (a
        // second) end the link.
        let mut failures = 0;
        // Dropping what is left of a batch whose first message was lost.
        let mut skipping = false;
        loop {
            let due = self.tick_at.load(Ordering::SeqCst);
            let now = sys::monotonic_ns();
            // Cleared only if no new tick was asked for meanwhile.
            if due != 0
                && now >= due
                && self
                    .tick_at
                    .compare_exchange(due, 0, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
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
                    failures += 1;
                    if failures >= PERSISTENT {
                        let why = format!("could not wait on the link {failures} times: {e}");
                        self.push(Incoming::End(why), wake);
                        return;
                    }
                    std::thread::sleep(RETRY);
                    continue;
                }
            }
            let message = match self.read_one(&mut buf) {
                // The message was taken off the socket and lost (it, or its
                // descriptors, did not fit here: `RLIMIT_NOFILE`). If it
                // began a batch, the batch's descriptors follow: they are
                // dropped as they come, and the sender, never answered,
                // keeps the batch.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    tracing::warn!("a message on the link did not fit here ({e}); dropped");
                    skipping = true;
                    continue;
                }
                Ok(Incoming::Batched) if skipping => continue,
                Err(e) => {
                    failures += 1;
                    if failures < PERSISTENT {
                        std::thread::sleep(RETRY);
                        continue;
                    }
                    Incoming::End(format!("could not read the link {failures} times: {e}"))
                }
                Ok(message) => message,
            };
            failures = 0;
            skipping = false;
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

    /// Receives one message. A peer that exited with messages of ours
    /// unread leaves `ECONNRESET` here, reported once, before the messages
    /// it sent: those are read past it.
    fn receive(&self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<usize> {
        match sys::recv_message(self.sock.as_fd(), buf, fds) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                match sys::wait_readable(self.sock.as_fd(), Duration::ZERO) {
                    Ok(true) => sys::recv_message(self.sock.as_fd(), buf, fds).or(Ok(0)),
                    _ => Ok(0),
                }
            }
            other => other,
        }
    }

    /// Reads one message (a batch: with its descriptors, which follow in
    /// `fds` messages); an error of the first read, before anything was
    /// taken off the socket, is the caller's to try again.
    fn read_one(&self, buf: &mut [u8]) -> std::io::Result<Incoming> {
        let came_ns = sys::monotonic_ns();
        let mut fds = Vec::new();
        let n = self.receive(buf, &mut fds)?;
        if n == 0 && fds.is_empty() {
            return Ok(Incoming::End("the other process closed the link".into()));
        }
        Ok(self.parse(buf, n, fds, came_ns))
    }

    fn parse(&self, buf: &mut [u8], n: usize, fds: Vec<OwnedFd>, came_ns: u64) -> Incoming {
        let m = &buf[..n];
        if m == FDS {
            return Incoming::Batched;
        }
        if m == DONE {
            return Incoming::Done;
        }
        if m == JOINED {
            return Incoming::Joined;
        }
        if let Some(bytes) = m.strip_prefix(FWD.as_bytes()) {
            return Incoming::Forwarded(bytes.to_vec());
        }
        let text = String::from_utf8_lossy(m);
        let id = |word: &str| text.strip_prefix(word).and_then(|n| n.parse::<u64>().ok());
        if let Some(id) = id(TOOK) {
            return Incoming::Took(id);
        }
        if let Some(id) = id(YOURS) {
            return Incoming::Yours(id);
        }
        if let Some(id) = id(MINE) {
            return Incoming::Mine(id);
        }
        if let Some(n) = id(ACK) {
            return Incoming::Ack(n);
        }
        let refused = text
            .strip_prefix(REFUSED)
            .and_then(|rest| rest.split_once(' '))
            .and_then(|(id, reason)| Some((id.parse().ok()?, reason)));
        if let Some((id, reason)) = refused {
            return Incoming::Refused(id, reason.to_owned());
        }
        if let Some(rest) = text.strip_prefix(BACK) {
            let mut words = rest.split_whitespace().map(|w| w.parse::<u64>().ok());
            return match (words.next().flatten(), words.next().flatten()) {
                (Some(batch), Some(ms)) => Incoming::Back {
                    batch: usize::try_from(batch).unwrap_or(usize::MAX).max(1),
                    every: Duration::from_millis(ms),
                },
                _ => Incoming::End(format!("a malformed message {text:?}")),
            };
        }
        if let Some(rest) = text.strip_prefix(USERS) {
            return match parse_users(rest) {
                Some((id, count, seen)) => {
                    self.read_batch(Announced { id, count, seen }, fds, buf, came_ns)
                }
                None => Incoming::End(format!("a malformed message {text:?}")),
            };
        }
        Incoming::End(format!("an unknown message {text:?}"))
    }

    /// The rest of a batch: the records' memfd came with `users`; its
    /// descriptors follow.
    fn read_batch(
        &self,
        batch: Announced,
        first: Vec<OwnedFd>,
        buf: &mut [u8],
        came_ns: u64,
    ) -> Incoming {
        let Announced { id, count, seen } = batch;
        let Ok([records]) = <[OwnedFd; 1]>::try_from(first) else {
            return Incoming::End("a batch came without its records".into());
        };
        let records = match read_records(&records) {
            Ok(r) => r,
            Err(e) => return Incoming::End(format!("could not read a batch's records: {e}")),
        };
        let mut fds = Vec::with_capacity(count.min(4096));
        // The sender sends them `MAX_FDS_PER_MESSAGE` at a time: a message
        // whose descriptors did not fit here (`MSG_CTRUNC`: this process's
        // `RLIMIT_NOFILE`) is counted as that many, the rest still read, and
        // the batch refused as a whole (the sender keeps it).
        let mut lost = 0;
        let mut why = None;
        let mut failures = 0;
        let gave_up = numbered(MINE, id);
        while fds.len() + lost < count {
            let expected = (count - fds.len() - lost).min(sys::MAX_FDS_PER_MESSAGE);
            match self.receive(buf, &mut fds) {
                Ok(n) if &buf[..n] == FDS => {}
                // The sender gave the batch up halfway (it could not send
                // the rest): it keeps it.
                Ok(n) if buf[..n] == gave_up[..] => return Incoming::Mine(id),
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
                // A passing error: nothing was taken off the socket.
                Err(_) if failures + 1 < PERSISTENT => {
                    failures += 1;
                    std::thread::sleep(RETRY);
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
            return Incoming::Unreceived(
                id,
                format!("{lost} of the batch's {count} descriptors could not be received ({why})"),
            );
        }
        Incoming::Users(Received {
            id,
            seen,
            records,
            fds,
            came_ns,
        })
    }

    /// Sends one message. A passing refusal (`ETOOMANYREFS`: the other
    /// process is taking the descriptors in flight; `ENOBUFS`, `ENOMEM`,
    /// `EIO`) is tried again for a second. A send that waited
    /// [`SEND_LIMIT`] (the other process reads nothing: stopped, or stuck)
    /// ends the link: a process never waits on it for good.
    pub(super) fn send(&self, message: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        let until = Instant::now() + Duration::from_secs(1);
        loop {
            match sys::send_message(self.sock.as_fd(), message, fds) {
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETOOMANYREFS | libc::ENOBUFS | libc::ENOMEM | libc::EIO)
                    ) && Instant::now() < until =>
                {
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.close();
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "the other process read nothing for {} s: the link is closed",
                            SEND_LIMIT.as_secs()
                        ),
                    ));
                }
                done => return done,
            }
        }
    }

    /// Sends batch `id`: the records in a sealed memfd, then the
    /// descriptors.
    pub(super) fn send_batch(
        &self,
        id: u64,
        seen: u64,
        records: &[u8],
        fds: &[RawFd],
    ) -> std::io::Result<()> {
        let memfd = write_records(records)?;
        let first = format!("{USERS}{id} {} {seen}", fds.len());
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
    /// picks and takes it; the others stay queued, in order. The link's end
    /// ends the wait too, and stays queued (the event loop learns of it as
    /// well). `None` when the time ran out.
    pub(super) fn wait_for(
        &self,
        deadline: Instant,
        wanted: impl Fn(&Incoming) -> bool,
    ) -> Option<Incoming> {
        let mut queue = self.queue();
        loop {
            if let Some(at) = queue.iter().position(&wanted) {
                return queue.remove(at);
            }
            if let Some(Incoming::End(why)) = queue.iter().find(|m| matches!(m, Incoming::End(_))) {
                return Some(Incoming::End(why.clone()));
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

/// What `users ID COUNT SEEN` announced.
struct Announced {
    id: u64,
    count: usize,
    seen: u64,
}

/// `users ID COUNT SEEN`, with a COUNT a batch can have.
fn parse_users(rest: &str) -> Option<(u64, usize, u64)> {
    let mut words = rest.split_whitespace();
    let id = words.next()?.parse().ok()?;
    let count = words.next()?.parse().ok().filter(|c| *c <= MAX_BATCH_FDS)?;
    let seen = words.next()?.parse().ok()?;
    words.next().is_none().then_some((id, count, seen))
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
    let size = sys::file_size(sealed.fd())?;
    let len = usize::try_from(size)
        .ok()
        .filter(|_| size <= MAX_RECORDS)
        .ok_or_else(|| std::io::Error::other(format!("records of {size} bytes: too large")))?;
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

/// `refused ID REASON` for the other process, cut to a message.
pub(super) fn refusal(id: u64, reason: &str) -> Vec<u8> {
    let mut bytes = format!("{REFUSED}{id} {reason}").into_bytes();
    bytes.truncate(MAX_MESSAGE);
    bytes
}

/// `WORD ID`.
pub(super) fn numbered(word: &str, id: u64) -> Vec<u8> {
    format!("{word}{id}").into_bytes()
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
    fn a_batch_crosses_with_its_id_records_and_descriptors() {
        let (a, b, _rx) = pair();
        let files: Vec<OwnedFd> = (0..300)
            .map(|_| OwnedFd::from(std::fs::File::open("/dev/null").unwrap()))
            .collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        a.send_batch(3, 7, b"the records", &raw).unwrap();
        match wait(&b) {
            Incoming::Users(Received {
                id,
                seen,
                records,
                fds,
                ..
            }) => {
                assert_eq!((id, seen), (3, 7));
                assert_eq!(records, b"the records");
                assert_eq!(fds.len(), 300);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_batch_given_up_halfway_is_the_senders() {
        let (a, b, _rx) = pair();
        let memfd = write_records(b"r").unwrap();
        a.send(b"users 9 600 0", &[memfd.as_raw_fd()]).unwrap();
        let null = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        a.send(FDS, &[null.as_raw_fd()]).unwrap();
        a.send(&numbered(MINE, 9), &[]).unwrap();
        a.send(b"fwd after", &[]).unwrap();
        assert!(matches!(wait(&b), Incoming::Mine(9)));
        assert!(matches!(wait(&b), Incoming::Forwarded(m) if m == b"after"));
    }

    #[test]
    fn the_words_read_back_and_garbage_ends_the_link() {
        let (a, b, _rx) = pair();
        for m in [
            &numbered(TOOK, 1)[..],
            &numbered(YOURS, 2),
            &numbered(MINE, 3),
            DONE,
            JOINED,
            b"fwd hello",
            b"ack 12",
            b"back 3 250",
            &refusal(4, "no room"),
        ] {
            a.send(m, &[]).unwrap();
        }
        let got: Vec<String> = (0..9).map(|_| format!("{:?}", wait(&b))).collect();
        assert_eq!(
            got,
            [
                "Took(1)",
                "Yours(2)",
                "Mine(3)",
                "Done",
                "Joined",
                "Forwarded([104, 101, 108, 108, 111])",
                "Ack(12)",
                "Back { batch: 3, every: 250ms }",
                "Refused(4, \"no room\")"
            ]
        );
        for garbage in [&b"users x"[..], b"users 1 99999999999 0", b"took", b"hello"] {
            let (c, d, _rx2) = pair();
            c.send(garbage, &[]).unwrap();
            assert!(matches!(wait(&d), Incoming::End(_)), "{garbage:?}");
            assert!(d.ended());
        }
    }

    #[test]
    fn waiting_for_one_message_leaves_the_others_and_the_end_queued() {
        let (a, b, _rx) = pair();
        a.send(b"fwd 1", &[]).unwrap();
        a.send(b"fwd 2", &[]).unwrap();
        a.send(&numbered(TOOK, 5), &[]).unwrap();
        let took = b.wait_for(Instant::now() + Duration::from_secs(5), |m| {
            matches!(m, Incoming::Took(5))
        });
        assert!(matches!(took, Some(Incoming::Took(5))));
        assert!(matches!(b.next(), Some(Incoming::Forwarded(m)) if m == b"1"));
        assert!(matches!(b.next(), Some(Incoming::Forwarded(m)) if m == b"2"));
        assert!(
            b.wait_for(Instant::now() + Duration::from_millis(20), |_| true)
                .is_none()
        );
        // The end answers a wait, and is still there for the loop.
        a.close();
        let end = b.wait_for(Instant::now() + Duration::from_secs(5), |m| {
            matches!(m, Incoming::Took(6))
        });
        assert!(matches!(end, Some(Incoming::End(_))));
        assert!(matches!(b.next(), Some(Incoming::End(_))));
    }
}
