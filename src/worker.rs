//! The runtime's one helper thread, started in `boot`: it runs the probe,
//! reaps the holder and writes the outcome of an upgrade, off the event
//! loop; in the commit and the resume it does the per-descriptor half of
//! the work beside the main thread.
//!
//! # Why one thread, started early
//!
//! The standard library aborts the whole process when a new thread cannot
//! get its memory (its stack or its signal stack: `mmap` failing with
//! `ENOMEM`); there is no error to handle. A thread started in the middle
//! of an upgrade would turn memory pressure into an outage of the old
//! image. Started in `boot` instead, such an abort happens where it is
//! survived: after an upgrade the rollback is armed (SIGABRT runs it), and
//! on a first start the server simply does not start.
//!
//! The thread blocks the reload signals ([`HELD_SIGNALS`]), so that they are
//! always handled by the application's threads: one delivered to this
//! thread while an upgrade commits would set a flag that the exec forgets.
//!
//! [`HELD_SIGNALS`]: crate::signal::HELD_SIGNALS

use std::io;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// How long the thread sleeps, idle, before it looks at its queue again
/// on its own: a wake-up that never came (no kernel loses one, a fault
/// injector can: `FUTEX_WAKE` failed with `EINTR`) delays a job by at most
/// this.
const IDLE_LOOK: Duration = Duration::from_secs(1);

/// How long an [`Offer`] waits for the thread to start its work before the
/// caller takes it back and does it itself.
const TAKE_BACK_AFTER: Duration = Duration::from_millis(5);

/// A job for the helper thread.
type Job = Box<dyn FnOnce() + Send>;

/// The helper thread's queue. Jobs run one at a time, in order.
#[derive(Debug)]
pub(crate) struct Worker {
    jobs: mpsc::Sender<Job>,
}

impl Worker {
    /// Starts the thread. (If the thread cannot get its memory, the
    /// standard library aborts the process: see the module docs.)
    pub(crate) fn start() -> io::Result<Worker> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("copyover-worker".into())
            .spawn(move || {
                let _ = crate::signal::hold();
                loop {
                    let job = match queue.recv_timeout(IDLE_LOOK) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => break,
                    };
                    // A job that panics does not take the thread with it.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })?;
        Ok(Worker { jobs })
    }

    /// Offers `work` on `input` to the thread, for the caller to do
    /// something else meanwhile; see [`Offer`].
    pub(crate) fn offer<I, O>(&self, input: I, work: fn(I) -> O) -> Offer<I, O>
    where
        I: Send + 'static,
        O: Send + 'static,
    {
        let slot = Arc::new(Mutex::new(Some(input)));
        let (done, output) = mpsc::sync_channel(1);
        let theirs = Arc::clone(&slot);
        // If the thread is gone, the job is dropped and the caller takes
        // the input back.
        let _ = self.run(move || {
            let input = theirs.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some(input) = input {
                let _ = done.send(work(input));
            }
        });
        Offer {
            slot,
            output: Some(output),
            work,
        }
    }

    /// Queues `job`, or runs it here if the thread is gone.
    pub(crate) fn run_or_here(&self, job: impl FnOnce() + Send + 'static) {
        if let Err(mpsc::SendError(job)) = self.jobs.send(Box::new(job)) {
            job();
        }
    }

    /// Waits until every job queued so far has run, or `limit` passed.
    pub(crate) fn flush_for(&self, limit: Duration) {
        let (done, wait) = mpsc::sync_channel(1);
        if self
            .run(move || {
                let _ = done.send(());
            })
            .is_ok()
        {
            // An error means the thread is gone: nothing left to wait for.
            let _ = wait.recv_timeout(limit);
        }
    }

    /// Queues `job`.
    ///
    /// # Errors
    ///
    /// If the thread is gone (it ended: a job that panics does not end
    /// it, so only a failure of the standard library's could).
    pub(crate) fn run(&self, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        self.jobs
            .send(Box::new(job))
            .map_err(|_| io::Error::other("the runtime's helper thread is gone"))
    }
}

/// Work offered to the helper thread that its caller can take back: the
/// input waits in a slot, and whoever takes it first does the work. The
/// caller waits for the output, and does the work itself if the thread has
/// not started it within [`TAKE_BACK_AFTER`] (the thread is busy with a
/// longer job, or never woke up). Dropped unwaited, it takes the work back,
/// or waits for the thread to finish it: nothing of it happens later.
pub(crate) struct Offer<I, O> {
    slot: Arc<Mutex<Option<I>>>,
    output: Option<mpsc::Receiver<O>>,
    work: fn(I) -> O,
}

impl<I, O> Offer<I, O> {
    /// The work's output. `None` only if the thread started the work and
    /// died doing it (a panic, which the panic hook has reported).
    pub(crate) fn wait(mut self) -> Option<O> {
        let output = self.output.take()?;
        loop {
            let gone = match output.recv_timeout(TAKE_BACK_AFTER) {
                Ok(out) => return Some(out),
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => true,
            };
            if let Some(input) = self.take_back() {
                return Some((self.work)(input));
            }
            if gone {
                return None;
            }
        }
    }

    fn take_back(&self) -> Option<I> {
        self.slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl<I, O> Drop for Offer<I, O> {
    fn drop(&mut self) {
        let Some(output) = self.output.take() else {
            return;
        };
        if self.take_back().is_some() {
            return;
        }
        // Started: wait until it is done (or the thread died doing it).
        while let Err(RecvTimeoutError::Timeout) = output.recv_timeout(TAKE_BACK_AFTER) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offered_work_is_done_once_by_one_side() {
        let worker = Worker::start().unwrap();
        assert_eq!(worker.offer(20, |n| n + 1).wait(), Some(21));

        // The thread busy with a longer job: the caller takes the work back.
        let (release, blocked) = mpsc::channel::<()>();
        worker
            .run(move || {
                let _ = blocked.recv();
            })
            .unwrap();
        let me = std::thread::current().id();
        let offer = worker.offer(me, |caller| std::thread::current().id() == caller);
        assert_eq!(offer.wait(), Some(true), "done by the caller");
        release.send(()).unwrap();
        // The job the thread finds later has nothing left to do, and the
        // thread goes on with the next.
        assert_eq!(worker.offer(1, |n| n * 2).wait(), Some(2));

        // Dropped unwaited: taken back or finished, never done later.
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (release, blocked) = mpsc::channel::<()>();
        worker
            .run(move || {
                let _ = blocked.recv();
            })
            .unwrap();
        drop(worker.offer(Arc::clone(&done), |d| {
            d.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        release.send(()).unwrap();
        worker.flush_for(Duration::from_secs(10));
        assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
}
