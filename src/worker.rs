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
use std::sync::mpsc;

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
                for job in queue {
                    // A job that panics does not take the thread with it.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })?;
        Ok(Worker { jobs })
    }

    /// Queues `job`, or runs it here if the thread is gone.
    pub(crate) fn run_or_here(&self, job: impl FnOnce() + Send + 'static) {
        if let Err(mpsc::SendError(job)) = self.jobs.send(Box::new(job)) {
            job();
        }
    }

    /// Waits until every job queued so far has run.
    pub(crate) fn flush(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        if self
            .run(move || {
                let _ = done.send(());
            })
            .is_ok()
        {
            // An error means the thread is gone: nothing left to wait for.
            let _ = wait.recv();
        }
    }

    /// Queues `job`.
    ///
    /// # Errors
    ///
    /// If the thread is gone (a job panicked).
    pub(crate) fn run(&self, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        self.jobs
            .send(Box::new(job))
            .map_err(|_| io::Error::other("the runtime's helper thread is gone"))
    }
}
