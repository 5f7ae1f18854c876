//! The runtime's threads: a builder whose threads block the reload signals
//! from birth, and the mask held while the probe's thread is made.

use super::*;

/// Blocks [`HELD_SIGNALS`](crate::signal::HELD_SIGNALS) in the calling
/// thread, for good. Give it to `Builder::on_thread_start` if you build
/// your own runtime (what [`runtime_builder`] does), and call it first in
/// any thread you spawn yourself: only the main thread may handle the
/// reload signals.
pub fn mask_held_signals() {
    // Cannot fail with a valid `how` and set.
    let _ = crate::sys::block_signals(&crate::signal::HELD_SIGNALS);
}

/// The held signals blocked in this thread until dropped; the previous mask
/// is then put back.
pub(super) struct Masked(Option<crate::sys::SavedMask>);

impl Masked {
    pub(super) fn now() -> Masked {
        Masked(crate::sys::block_signals(&crate::signal::HELD_SIGNALS).ok())
    }
}

impl Drop for Masked {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = crate::sys::restore_mask(old);
        }
    }
}

/// A multi-threaded runtime builder (`enable_all`) whose worker and
/// blocking-pool threads block the held signals (see the module docs).
/// Add your own settings, then build it with [`build_runtime`].
pub fn runtime_builder() -> ::tokio::runtime::Builder {
    let mut b = ::tokio::runtime::Builder::new_multi_thread();
    b.enable_all().on_thread_start(mask_held_signals);
    b
}

/// Builds [`runtime_builder`]'s runtime. Call it after
/// [`boot`](crate::boot), in the main thread.
///
/// # Errors
///
/// The runtime's own error if its threads or its I/O driver cannot be set
/// up.
pub fn runtime() -> io::Result<::tokio::runtime::Runtime> {
    build_runtime(&mut runtime_builder())
}

/// Builds `builder`'s runtime (from [`runtime_builder`], with your
/// settings) with the held signals blocked in the calling thread: threads
/// inherit the creating thread's mask, so the runtime's threads never run a
/// moment with the signals unblocked, not even before `on_thread_start`.
///
/// # Errors
///
/// The runtime's own error.
pub fn build_runtime(
    builder: &mut ::tokio::runtime::Builder,
) -> io::Result<::tokio::runtime::Runtime> {
    let _masked = Masked::now();
    builder.build()
}
