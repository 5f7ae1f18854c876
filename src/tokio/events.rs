//! The runtime's events as an `async fn` ([`AsyncCopyover`]).

use super::*;

/// A [`Copyover`] whose events are awaited: owned and `'static`, to keep
/// in the main task. It dereferences to the [`Copyover`] for everything
/// else ([`ready`](Copyover::ready), [`generation`](Copyover::generation),
/// ...).
pub struct AsyncCopyover<S> {
    co: Copyover<S>,
    /// A duplicate of [`Copyover::event_fd`] (the read end of the runtime's
    /// wake-up socket pair), registered with tokio as a Unix stream: safe
    /// code all the way, where an `AsyncFd` over a raw descriptor would
    /// need `unsafe`.
    wake: ::tokio::net::UnixStream,
}

impl<S> std::fmt::Debug for AsyncCopyover<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncCopyover")
            .field("co", &self.co)
            .finish_non_exhaustive()
    }
}

impl<S> AsyncCopyover<S> {
    /// Registers the runtime's event descriptor with tokio's reactor. Call
    /// it inside the runtime.
    ///
    /// # Errors
    ///
    /// If the descriptor cannot be duplicated or registered (no runtime).
    pub fn new(co: Copyover<S>) -> io::Result<AsyncCopyover<S>> {
        let fd: OwnedFd = co.event_fd().try_clone_to_owned()?;
        // Non-blocking already: the flag lives on the shared file description.
        let wake = ::tokio::net::UnixStream::from_std(unix::UnixStream::from(fd))?;
        Ok(AsyncCopyover { co, wake })
    }

    /// The next event. Cancel-safe: an event is taken only when this
    /// returns it, so it fits a `tokio::select!` loop.
    ///
    /// Every poll of the returned future asks the runtime first, so in a
    /// `biased` select an event whose signal was handled before anything
    /// else woke the task comes before that other thing.
    pub async fn next_event(&mut self) -> Event {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Event> {
        use std::task::Poll;
        loop {
            if let Some(event) = self.co.poll() {
                return Poll::Ready(event);
            }
            match self.wake.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                // The reactor is gone (the runtime shuts down): nothing
                // will wake us again.
                Poll::Ready(Err(_)) => return Poll::Pending,
                Poll::Ready(Ok(())) => {}
            }
            // Drained through tokio's registration, so that tokio clears its
            // readiness on `WouldBlock`; then the runtime is asked again: a
            // wake-up byte that came meanwhile is seen by that poll, a later
            // one makes the socket ready again.
            let mut buf = [0u8; 256];
            loop {
                match self.wake.try_read(&mut buf) {
                    Ok(n) if n > 0 => {}
                    // EOF cannot happen while the runtime lives (it holds
                    // the other end); were it to, nothing would wake us.
                    Ok(_) => return Poll::Pending,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
    }

    /// [`Copyover::upgrade`], with the held signals blocked in this thread
    /// while it runs, so that the probe's helper thread starts with them
    /// blocked (only the main thread may handle them). Call it from the
    /// main task: on [`Event::Upgrade`] with the state as you have it (the
    /// probe checks that the new binary reads it), on
    /// [`Event::UpgradeApproved`] with the state and the sockets that
    /// [`Quiesce::pause`] collected. A commit does not return on success.
    ///
    /// # Errors
    ///
    /// As [`Copyover::upgrade`]: the old image keeps serving.
    pub fn upgrade(&mut self, state: &S, keep: &Handoff<'_>) -> Result<Progress, UpgradeError>
    where
        S: AppState,
    {
        if !crate::sys::on_main_thread() {
            tracing::warn!(
                "upgrade called off the main thread: a signal that the main thread takes during \
                 the commit is lost; call it from the task given to block_on"
            );
        }
        let _masked = Masked::now();
        self.co.upgrade(state, keep)
    }

    /// The [`Copyover`] back.
    pub fn into_inner(self) -> Copyover<S> {
        self.co
    }
}

impl<S> Deref for AsyncCopyover<S> {
    type Target = Copyover<S>;
    fn deref(&self) -> &Copyover<S> {
        &self.co
    }
}

impl<S> DerefMut for AsyncCopyover<S> {
    fn deref_mut(&mut self) -> &mut Copyover<S> {
        &mut self.co
    }
}
