//! What a server tells the runtime at `boot` ([`Config`]).

use super::*;

/// How an application runs under copyover.
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) app: String,
    pub(crate) version: String,
    pub(crate) binary: Option<PathBuf>,
    pub(crate) ready_timeout: Duration,
    pub(crate) probe_timeout: Duration,
    /// Listen for external newcomers (`PID.migration`), and which users
    /// besides this process's own may connect.
    pub(crate) migration_socket: bool,
    pub(crate) migration_peers: Vec<u32>,
}

impl Config {
    /// A configuration for the application `app` (its snapshots are refused
    /// by any other application) at version label `version` (shown in logs:
    /// "from v1 to v2").
    pub fn new(app: impl Into<String>, version: impl Into<String>) -> Self {
        Config {
            app: app.into(),
            version: version.into(),
            binary: None,
            ready_timeout: Duration::from_secs(10),
            probe_timeout: Duration::from_secs(5),
            migration_socket: false,
            migration_peers: Vec::new(),
        }
    }

    /// The binary executed on an upgrade. Default: the path this process
    /// was started from (`argv[0]` made absolute if it contains a `/`, so a
    /// symlink that a deploy switches is followed; else `/proc/self/exe`
    /// as resolved at start-up). Never `/proc/self/exe` at upgrade time,
    /// which names the old, replaced file.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// How long a new image may take from its `boot` to
    /// [`Copyover::ready`] before it is rolled back. Default 10 s.
    ///
    /// The old image's value also sets the holder's deadline, kept from
    /// outside the new image from just before the exec: this timeout and
    /// half of it again (at least 1 s more). A new image that has not
    /// become ready by then (it hangs before `main`, is stopped, or blocks
    /// SIGALRM) is killed, and the old binary is started again under the
    /// holder's PID with every client.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// How long the probe of a new binary may take. Default 5 s.
    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    /// Listen for **external newcomers**: a process of this application
    /// started by anything (another container, another mount namespace,
    /// another user) with `COPYOVER_JOIN=PATH` connects to this process's
    /// migration socket, `PID.migration` in the status directory, and
    /// takes over as by `copyover migrate` (see [`crate::migration`]). Off
    /// by default. The socket's file is open to every user who can reach
    /// the directory (mode 0700 unless the operator opens it, say to 0711,
    /// or bind-mounts it into a container); the kernel's record of who
    /// connected (`SO_PEERCRED`) is then checked: this process's own user,
    /// or one named by [`migration_peer`](Self::migration_peer). Anything
    /// else is refused and logged, with nothing sent.
    pub fn migration_socket(mut self, on: bool) -> Self {
        self.migration_socket = on;
        self
    }

    /// A user (by uid) besides this process's own whose processes may
    /// connect to the migration socket and take over.
    pub fn migration_peer(mut self, uid: u32) -> Self {
        self.migration_peers.push(uid);
        self
    }
}
