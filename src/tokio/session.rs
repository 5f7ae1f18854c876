//! One connection as it crosses an upgrade ([`Session`]): its transport
//! with its buffered bytes ([`Transport`], [`Buffers`]) and a record of
//! the application's; every session of a server, the state a
//! [`Server`](super::Server) hands over ([`Sessions`]).

use ::tokio::net::TcpStream;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::snapshot::SnapshotError;
use crate::state::AppState;

/// The bytes a connection's transport holds besides its socket: what it
/// read and has not decoded yet, what it was given and has not sent yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buffers {
    /// Read from the socket, not handed to the application yet (a
    /// half-typed line).
    pub unread: Vec<u8>,
    /// Handed to the transport, not written to the socket yet.
    pub unsent: Vec<u8>,
}

/// A connection's transport: its socket, perhaps wrapped with buffers.
///
/// Implemented for tokio's `TcpStream` (no buffers) and, with the
/// `tokio-util` feature, for `Framed<TcpStream, C>` for every codec `C`
/// that has a `Default`. (tokio's `BufReader` and `BufWriter` cannot be
/// given their bytes back, so they have no implementation: keep their
/// `buffer()` in the session's record, or use a `Framed`.)
pub trait Transport: Sized + Send + 'static {
    /// The socket, for the handoff.
    fn socket(&self) -> &TcpStream;
    /// Its buffered bytes, once its task is parked.
    fn buffers(&self) -> Buffers;
    /// The transport built again around the inherited socket, with its
    /// bytes back where they were.
    fn rebuild(socket: TcpStream, buffers: Buffers) -> Self;

    /// The TLS connection this transport carries, if any (the `tls`
    /// feature): its session crosses the upgrade beside the buffers, in a
    /// sealed memfd of its own, never in the snapshot.
    #[cfg(feature = "tls")]
    fn tls(&self) -> Option<&crate::tls::Connection> {
        None
    }

    /// The transport built again with its TLS connection; `None` for a
    /// transport that has no TLS.
    #[cfg(feature = "tls")]
    fn rebuild_tls(
        socket: TcpStream,
        buffers: Buffers,
        tls: crate::tls::Connection,
    ) -> Option<Self> {
        let _ = (socket, buffers, tls);
        None
    }
}

#[cfg(all(feature = "tls", feature = "tokio"))]
impl Transport for crate::tls::TlsStream {
    fn socket(&self) -> &TcpStream {
        self.get_ref()
    }

    /// Opened plaintext the application has not read; the ciphertext and
    /// the session cross with [`tls`](Transport::tls).
    fn buffers(&self) -> Buffers {
        Buffers {
            unread: self.unread().to_vec(),
            unsent: Vec::new(),
        }
    }

    /// Without its session (a previous image that had no TLS on this
    /// connection), the stream cannot read what comes: it fails, and the
    /// client goes.
    fn rebuild(socket: TcpStream, _: Buffers) -> Self {
        tracing::warn!("a TLS stream came without its session: it fails at once");
        crate::tls::TlsStream::new(socket, crate::tls::Connection::failed())
    }

    fn tls(&self) -> Option<&crate::tls::Connection> {
        Some(self.connection())
    }

    fn rebuild_tls(
        socket: TcpStream,
        buffers: Buffers,
        tls: crate::tls::Connection,
    ) -> Option<Self> {
        Some(crate::tls::TlsStream::with_unread(
            socket,
            tls,
            buffers.unread,
        ))
    }
}

#[cfg(all(feature = "tls", feature = "tokio-util"))]
impl<C: Default + Send + 'static> Transport
    for tokio_util::codec::Framed<crate::tls::TlsStream, C>
{
    fn socket(&self) -> &TcpStream {
        self.get_ref().get_ref()
    }

    /// The codec's unread bytes, then the stream's opened plaintext; the
    /// codec's unsent bytes.
    fn buffers(&self) -> Buffers {
        let mut unread = self.read_buffer().to_vec();
        unread.extend_from_slice(self.get_ref().unread());
        Buffers {
            unread,
            unsent: self.write_buffer().to_vec(),
        }
    }

    fn rebuild(socket: TcpStream, buffers: Buffers) -> Self {
        let stream = <crate::tls::TlsStream as Transport>::rebuild(socket, Buffers::default());
        framed_from(stream, buffers)
    }

    fn tls(&self) -> Option<&crate::tls::Connection> {
        Some(self.get_ref().connection())
    }

    fn rebuild_tls(
        socket: TcpStream,
        buffers: Buffers,
        tls: crate::tls::Connection,
    ) -> Option<Self> {
        Some(framed_from(
            crate::tls::TlsStream::new(socket, tls),
            buffers,
        ))
    }
}

/// A `Framed` around `io` with its bytes back where they were: a non-empty
/// read buffer is decoded before the stream is read again.
///
/// Most sessions cross with nothing unread: those get an empty read buffer
/// (`with_capacity(0)`, no allocation; the first read makes it), so that
/// restoring a thousand sessions inside the blackout does not allocate and
/// fault in 8 KiB of fresh heap twice for each. One with unread bytes goes
/// through `from_parts`, which marks them to be decoded first.
#[cfg(feature = "tokio-util")]
fn framed_from<T, C: Default>(io: T, buffers: Buffers) -> tokio_util::codec::Framed<T, C> {
    if buffers.unread.is_empty() {
        let mut framed = tokio_util::codec::Framed::with_capacity(io, C::default(), 0);
        framed.write_buffer_mut().extend_from_slice(&buffers.unsent);
        return framed;
    }
    let mut parts = tokio_util::codec::Framed::with_capacity(io, C::default(), 0).into_parts();
    parts.read_buf = buffers.unread[..].into();
    parts.write_buf = buffers.unsent[..].into();
    tokio_util::codec::Framed::from_parts(parts)
}

impl Transport for TcpStream {
    fn socket(&self) -> &TcpStream {
        self
    }

    fn buffers(&self) -> Buffers {
        Buffers::default()
    }

    fn rebuild(socket: TcpStream, buffers: Buffers) -> Self {
        if buffers != Buffers::default() {
            tracing::warn!(
                unread = buffers.unread.len(),
                unsent = buffers.unsent.len(),
                "a bare TcpStream cannot take buffered bytes back: they are dropped"
            );
        }
        socket
    }
}

#[cfg(feature = "tokio-util")]
impl<C: Default + Send + 'static> Transport for tokio_util::codec::Framed<TcpStream, C> {
    fn socket(&self) -> &TcpStream {
        self.get_ref()
    }

    fn buffers(&self) -> Buffers {
        Buffers {
            unread: self.read_buffer().to_vec(),
            unsent: self.write_buffer().to_vec(),
        }
    }

    fn rebuild(socket: TcpStream, buffers: Buffers) -> Self {
        framed_from(socket, buffers)
    }
}

/// One connection as the application keeps it in its task: a transport and
/// whatever else (a name, an inbox), saved to a record at an upgrade and
/// built again from it.
///
/// The record is versioned like the application's state ([`AppState`]):
/// bump [`VERSION`](Self::VERSION) when its layout changes, and teach
/// [`migrate`](Self::migrate) the old one; a build that cannot read the
/// records it is handed is refused by the probe.
pub trait Session: Sized + Send + 'static {
    /// Its socket and buffers.
    type Transport: Transport;
    /// What crosses the upgrade besides the transport (a name, a room).
    type Record: Serialize + DeserializeOwned + Send + 'static;
    /// The version of the record's layout.
    const VERSION: u32 = 1;
    /// The older versions [`migrate`](Self::migrate) reads. The probe
    /// checks a new build against it before anything pauses: a build
    /// whose `VERSION` and list miss the running records' version is
    /// refused.
    const MIGRATES_FROM: &'static [u32] = &[];

    /// Reads a record written by version `from`, one of
    /// [`MIGRATES_FROM`](Self::MIGRATES_FROM); `None` if this build cannot
    /// (the default).
    fn migrate(from: u32, payload: &[u8]) -> Option<Result<Self::Record, SnapshotError>> {
        let _ = (from, payload);
        None
    }

    /// Its transport.
    fn transport(&self) -> &Self::Transport;
    /// Its record, taken in its own task (in [`hold`](super::hold)) once
    /// every session's task has stopped, so that no other task writes to
    /// it afterwards (a message still in its inbox goes into its output
    /// here). If the upgrade does not happen, the session goes on as `save`
    /// left it.
    fn save(&mut self) -> Self::Record;
    /// It, built again from its record and transport: in the new image, or
    /// the old one after a rollback.
    fn restore(record: Self::Record, transport: Self::Transport) -> Self;
}

/// The state a [`Server`](super::Server) hands over: every session's
/// record and buffers, in handoff order ([`serve`](super::serve) boots
/// with it).
///
/// Each record is encoded on its own, with the session's
/// [`VERSION`](Session::VERSION), so that a new build whose records have
/// another layout reads the old ones through [`Session::migrate`].
pub struct Sessions<T: Session> {
    pub(super) entries: Vec<(Buffers, T::Record)>,
    /// Why a record could not be read ([`AppState::check`] says it).
    unreadable: Option<String>,
}

impl<T: Session> std::fmt::Debug for Sessions<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("len", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl<T: Session> Default for Sessions<T> {
    fn default() -> Self {
        Sessions::new(Vec::new())
    }
}

impl<T: Session> Sessions<T> {
    pub(super) fn new(entries: Vec<(Buffers, T::Record)>) -> Self {
        Sessions {
            entries,
            unreadable: None,
        }
    }

    /// How many sessions it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The encoded form: the records' version, then each session's buffers
/// and encoded record.
#[derive(Serialize, Deserialize)]
struct Wire {
    record_version: u32,
    entries: Vec<(Buffers, Vec<u8>)>,
}

impl<T: Session> Serialize for Sessions<T> {
    fn serialize<Ser: Serializer>(&self, serializer: Ser) -> Result<Ser::Ok, Ser::Error> {
        use serde::ser::Error as _;
        /// [`Wire`], borrowing the buffers.
        #[derive(Serialize)]
        struct WireRef<'a> {
            record_version: u32,
            entries: Vec<(&'a Buffers, Vec<u8>)>,
        }
        let entries = self
            .entries
            .iter()
            .map(|(buffers, record)| {
                postcard::to_allocvec(record)
                    .map(|bytes| (buffers, bytes))
                    .map_err(|e| Ser::Error::custom(format!("encoding a session's record: {e}")))
            })
            .collect::<Result<_, _>>()?;
        WireRef {
            record_version: T::VERSION,
            entries,
        }
        .serialize(serializer)
    }
}

impl<'de, T: Session> Deserialize<'de> for Sessions<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A record this build cannot read is not a decoding error (the
        // codec would drop the reason): `check` refuses the state with it.
        let wire = Wire::deserialize(deserializer)?;
        let mut sessions = Sessions::new(Vec::with_capacity(wire.entries.len()));
        // Checked with no session too: the probe's state has none.
        if let Err(why) = readable::<T>(wire.record_version) {
            sessions.unreadable = Some(why);
            return Ok(sessions);
        }
        for (i, (buffers, bytes)) in wire.entries.into_iter().enumerate() {
            match record::<T>(wire.record_version, &bytes) {
                Ok(record) => sessions.entries.push((buffers, record)),
                Err(e) => {
                    sessions.unreadable = Some(format!("session {i}'s record: {e}"));
                    break;
                }
            }
        }
        Ok(sessions)
    }
}

/// Whether this build reads records of `version`, and if not, why.
fn readable<T: Session>(version: u32) -> Result<(), String> {
    if version == T::VERSION || T::MIGRATES_FROM.contains(&version) {
        return Ok(());
    }
    Err(format!(
        "the sessions' records are version {version}; this build reads version {} and migrates \
         from {:?}",
        T::VERSION,
        T::MIGRATES_FROM
    ))
}

/// One record of version `version` (readable), migrated if need be.
fn record<T: Session>(version: u32, bytes: &[u8]) -> Result<T::Record, String> {
    if version == T::VERSION {
        return crate::snapshot::decode_state(bytes, version).map_err(|e| e.to_string());
    }
    match T::migrate(version, bytes) {
        Some(migrated) => migrated.map_err(|e| e.to_string()),
        None => Err(format!(
            "version {version} is in MIGRATES_FROM but migrate gave nothing for it"
        )),
    }
}

impl<T: Session> AppState for Sessions<T> {
    /// The wrapper's own layout; the records carry their own version.
    const VERSION: u32 = 1;

    fn check(&self) -> Result<(), String> {
        self.unreadable.clone().map_or(Ok(()), Err)
    }
}

// Only the records' decoding is generic here; the rest is tested with a
// real server (`tests/tokio_chat.rs`).
#[cfg(test)]
mod tests {
    use super::*;

    /// A session whose record is `R`, version `V`, migrating from 1 to 2.
    struct Fake<R, const V: u32>(TcpStream, std::marker::PhantomData<R>);

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct V1 {
        name: String,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct V2 {
        name: String,
        room: String,
    }

    impl<R: Serialize + DeserializeOwned + Send + 'static, const V: u32> Session for Fake<R, V>
    where
        R: From<V1>,
    {
        type Transport = TcpStream;
        type Record = R;
        const VERSION: u32 = V;
        const MIGRATES_FROM: &'static [u32] = if V == 2 { &[1] } else { &[] };
        fn migrate(from: u32, payload: &[u8]) -> Option<Result<R, SnapshotError>> {
            (from == 1).then(|| crate::snapshot::decode_state::<V1>(payload, 1).map(R::from))
        }
        fn transport(&self) -> &TcpStream {
            &self.0
        }
        fn save(&mut self) -> R {
            unreachable!("not saved in these tests")
        }
        fn restore(_: R, _: TcpStream) -> Self {
            unreachable!("not restored in these tests")
        }
    }

    impl From<V1> for V2 {
        fn from(v1: V1) -> V2 {
            V2 {
                name: v1.name,
                room: "lobby".into(),
            }
        }
    }

    type Old = Fake<V1, 1>;
    type New = Fake<V2, 2>;

    fn buffers(unread: &[u8]) -> Buffers {
        Buffers {
            unread: unread.to_vec(),
            unsent: b"hi\n".to_vec(),
        }
    }

    #[test]
    fn sessions_round_trip_and_migrate_each_record() {
        let old = Sessions::<Old>::new(vec![
            (buffers(b"par"), V1 { name: "ann".into() }),
            (buffers(b""), V1 { name: "bob".into() }),
        ]);
        let bytes = postcard::to_allocvec(&old).unwrap();
        let same: Sessions<Old> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(same.entries, old.entries);
        let new: Sessions<New> = postcard::from_bytes(&bytes).unwrap();
        let lobby = |name: &str| V2 {
            name: name.into(),
            room: "lobby".into(),
        };
        assert_eq!(
            new.entries,
            [
                (buffers(b"par"), lobby("ann")),
                (buffers(b""), lobby("bob"))
            ]
        );
        // An older build cannot read newer records: the whole state is
        // refused (by the probe, before anything happens).
        let newer = postcard::to_allocvec(&new).unwrap();
        let err = crate::state::restore::<Sessions<Old>>("app", 1, &newer).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the state (v1) decoded but is refused: the sessions' records are version 2; \
             this build reads version 1 and migrates from []"
        );
        // The same with no session at all: what the probe sends.
        let none = postcard::to_allocvec(&Sessions::<New>::default()).unwrap();
        assert!(crate::state::restore::<Sessions<Old>>("app", 1, &none).is_err());
        assert!(crate::state::restore::<Sessions<New>>("app", 1, &none).is_ok());
        let old_none = postcard::to_allocvec(&Sessions::<Old>::default()).unwrap();
        assert!(crate::state::restore::<Sessions<New>>("app", 1, &old_none).is_ok());
    }
}
