//! Snapshots for staging: written on request, read back by a staging
//! server.

use super::*;

impl<S> Copyover<S> {
    /// Writes a snapshot of `state` (without descriptors) to `path`, for a
    /// staging server (`--restore-from`). Serving goes on.
    ///
    /// The file is created mode 0600 under a fresh temporary name in the
    /// same directory (`O_EXCL|O_NOFOLLOW`), synced, then renamed over
    /// `path`: a reader sees the old file or the whole new one.
    ///
    /// # Errors
    ///
    /// [`UpgradeError::Snapshot`] if it cannot be encoded or written.
    pub fn save_snapshot(&self, state: &S, path: &Path) -> Result<(), UpgradeError>
    where
        S: AppState,
    {
        let mut header = self.header(monotonic_ns());
        header.state_version = S::VERSION;
        let payload = crate::snapshot::encode_state(state)?;
        let bytes = crate::snapshot::encode(&header, &Default::default(), &payload)?;
        // Every user's data is in it: 0600, a fresh temporary name that no
        // planted symlink can redirect, synced before it replaces the file.
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        crate::status::write_replacing(dir, path, &bytes, true).map_err(|source| {
            UpgradeError::Io {
                what: "write the snapshot file",
                source,
            }
        })?;
        tracing::info!(path = ?path, generation = self.generation, "snapshot saved");
        Ok(())
    }

    /// Reads the state of a snapshot file written by
    /// [`save_snapshot`](Self::save_snapshot), checking the app and the
    /// state version as an upgrade would.
    ///
    /// # Errors
    ///
    /// [`Error::Snapshot`] if the file is unreadable, corrupt, of another
    /// app, or of a state version this binary cannot read.
    pub fn restore_from_file(&self, path: &Path) -> Result<S, Error>
    where
        S: AppState,
    {
        let snap = crate::snapshot::read_file(path)?;
        snap.check_app(&self.config.app)?;
        Ok(restore::<S>(
            &self.config.app,
            snap.header.state_version,
            snap.payload(),
        )?)
    }
}
