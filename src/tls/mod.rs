//! TLS 1.3 connections that cross an upgrade with their session (the `tls`
//! feature): same TLS session, no new handshake, nothing lost.
//!
//! A TLS session lives in the process's memory: after an exec, a new image
//! would hold a socket in the middle of an encrypted stream and nothing to
//! read it with. This module keeps what the session is (its cipher suite,
//! both directions' traffic keys and IVs, their sequence numbers, and the
//! bytes read but not yet opened or sealed but not yet sent) so that the
//! next image carries on with the same session.
//!
//! # How
//!
//! * rustls does the handshake ([`Connection::accept`]), then gives the
//!   session's keys through its `kernel` API (the one meant for kTLS).
//! * From then on, this module frames the records and numbers them; rustls's
//!   crypto provider seals and opens them (the negotiated suite's
//!   `Tls13AeadAlgorithm`). No cryptography is written here.
//! * At the commit, [`Carry`] writes every session into a sealed memfd,
//!   kept in the handoff beside the sockets; the next image restores them
//!   with [`Carried`].
//!
//! # What crosses, what does not
//!
//! * **TLS 1.3** sessions on [`Config`]'s suites (AES-256-GCM,
//!   ChaCha20-Poly1305). TLS 1.2 is not offered.
//! * **A hello not answered yet** crosses as bytes; the next image answers
//!   it. A handshake between its answer and its end cannot cross (its
//!   ephemeral keys are rustls's): the server waits for it, one round trip,
//!   and holds new hellos meanwhile ([`Connection::can_cross`],
//!   [`Connection::hold`]).
//! * **Key updates.** Before any upgrade, rustls computes the new keys of
//!   a key update (ours or the peer's). The traffic secrets they come from
//!   stay inside rustls and do not cross: after an upgrade, a peer's key
//!   update, or keys worn to their confidentiality limit, end the
//!   connection with an alert ([`TlsError::KeyUpdateAfterUpgrade`],
//!   [`TlsError::KeysWornOut`]). The client reconnects.
//!
//! # No nonce twice
//!
//! Two records sealed with the same key and sequence number would be a
//! catastrophic nonce reuse. A restored connection therefore seals, opens
//! and answers nothing until this image calls
//! [`Copyover::ready`](crate::Copyover::ready): should the new image fail
//! before that, the old one, restored from the untouched sessions, finds
//! the peer where it left it. What is written meanwhile is queued.
//!
//! # Secrets
//!
//! The keys cross only in that sealed memfd, never in the application's
//! state: the SIGUSR1 snapshot and `copyover inspect` cannot show them, and
//! they are never in the environment. In memory they are overwritten when
//! dropped.
//!
//! # A server
//!
//! The telnet demo (`src/bin/copyover-telnetd`) serves TLS beside plain
//! telnet with this module; its `tls.rs` is a complete example for an epoll
//! loop. With tokio (the `tokio` feature too), [`TlsStream`] is the
//! connection as an `AsyncRead + AsyncWrite` stream, and a
//! [`copyover::tokio::Server`](crate::tokio::Server) carries its sessions
//! itself (`examples/tokio-chat-tls.rs`).

mod blocking;
mod carry;
mod config;
mod connection;
mod record;
#[cfg(feature = "tokio")]
mod stream;

pub use blocking::Stream;
#[cfg(feature = "tokio")]
pub(crate) use carry::Saved;
pub use carry::{Carried, Carry, Sessions};
pub use config::Config;
pub use connection::Connection;
#[cfg(feature = "tokio")]
pub use stream::TlsStream;

/// Why a TLS connection cannot go on, or cannot cross an upgrade.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rustls refused the configuration.
    #[error("the TLS configuration was refused: {reason}")]
    Config {
        /// What rustls or the file said.
        reason: String,
    },
    /// The handshake failed.
    #[error(
        "the TLS handshake failed: {0} (check that the client speaks TLS 1.3 and trusts the certificate)"
    )]
    Handshake(rustls::Error),
    /// The peer broke the record protocol (or a record did not open).
    #[error("the peer broke the TLS record protocol: {reason}; the connection cannot go on")]
    Protocol {
        /// What was wrong.
        reason: String,
    },
    /// The peer sent a fatal alert.
    #[error("the peer ended the TLS session with the alert {description}")]
    Alert {
        /// The alert's description.
        description: String,
    },
    /// The peer asked for new keys after an upgrade.
    #[error(
        "the peer sent a TLS key update after an upgrade: the secret new keys derive from does not cross an exec, so the connection was ended with an alert (the client reconnects)"
    )]
    KeyUpdateAfterUpgrade,
    /// The keys reached their confidentiality limit after an upgrade.
    #[error(
        "the session's keys reached their cipher suite's confidentiality limit after an upgrade, where no new keys can be derived; the connection was ended"
    )]
    KeysWornOut,
    /// A handshake answered and not ended cannot cross.
    #[error(
        "the connection is in the middle of its TLS handshake and cannot cross an upgrade now; wait for it (one round trip, see Connection::can_cross) and hold new handshakes meanwhile (Connection::hold)"
    )]
    InHandshake,
    /// The session cannot be carried.
    #[error("this TLS session cannot cross an upgrade: {reason}")]
    Unsupported {
        /// Why.
        reason: String,
    },
    /// The connection failed earlier, or was closed.
    #[error("this TLS connection failed or was closed; close its socket")]
    Failed,
    /// The sessions could not be written or read.
    #[error("carrying the TLS sessions across the upgrade failed: {reason}")]
    Carry {
        /// What failed.
        reason: String,
    },
}
