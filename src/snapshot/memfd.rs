//! The snapshot in transit: written into a memfd, cut to size and sealed
//! (or encoded straight into a memfd prepared ahead, [`Draft`]), then
//! checked and mapped read-only by the image that reads it.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;

use serde::Serialize;

use super::error::{SnapshotError, encode_err, io_err};
use super::format::{
    HEADER_LEN, Header, Payload, Prefix, Snapshot, encode_prefix, encode_state_with_capacity,
    finish_head, parse,
};
use super::manifest::Manifest;
use crate::sys;

/// Writes a snapshot into a new memfd and seals it.
///
/// The memfd is close-on-exec; the upgrade clears that flag just before the
/// exec. `payload` is the already-encoded state.
///
/// # Errors
///
/// [`SnapshotError::Io`] if the memfd cannot be created, written or sealed
/// (for example `ENOMEM`), [`SnapshotError::Encode`] if the manifest cannot
/// be encoded.
pub fn write_sealed(
    header: &Header,
    manifest: &Manifest,
    payload: &[u8],
) -> Result<OwnedFd, SnapshotError> {
    Draft::new(0)?.seal(header, manifest, payload)
}

/// A memfd made ready for a snapshot ahead of time: the upgrade creates one
/// while the probe runs, with its pages allocated and mapped, so that at the
/// commit the state is encoded straight into memory that is already there.
#[derive(Debug)]
pub struct Draft {
    file: File,
    /// The reserve, mapped writable and populated.
    map: Option<sys::Mapping>,
}

impl Draft {
    /// Creates the memfd and allocates and maps `reserve` bytes of it.
    ///
    /// # Errors
    ///
    /// [`SnapshotError::Io`] if the memfd cannot be created. A failed
    /// allocation or mapping only leaves the memfd empty (it then grows as
    /// written).
    pub fn new(reserve: u64) -> Result<Draft, SnapshotError> {
        let fd = sys::memfd_create(c"copyover-snapshot").map_err(io_err("create"))?;
        let mut map = None;
        if let Ok(size) = usize::try_from(reserve)
            && size > 0
            && sys::allocate(fd.as_fd(), reserve).is_ok()
        {
            map = sys::map_region(fd.as_fd(), size, true).ok();
        }
        Ok(Draft {
            file: File::from(fd),
            map,
        })
    }

    /// Writes the snapshot, cuts the memfd to its exact length and seals it.
    ///
    /// # Errors
    ///
    /// As [`write_sealed`].
    pub fn seal(
        self,
        header: &Header,
        manifest: &Manifest,
        payload: &[u8],
    ) -> Result<OwnedFd, SnapshotError> {
        let prefix = encode_prefix(header, manifest)?;
        drop(self.map);
        write_and_seal(self.file, header, &prefix, payload)
    }

    /// Encodes `state` straight into the memfd, through a writable mapping
    /// of it: no intermediate buffer, no second copy. `hint` is the expected
    /// payload size (the last snapshot's); if the state turns out larger,
    /// it is encoded into a buffer and written instead. Then cuts the memfd
    /// to size and seals it. Returns the memfd and the payload's size.
    ///
    /// # Errors
    ///
    /// As [`write_sealed`].
    pub fn seal_state<T: Serialize + ?Sized>(
        mut self,
        header: &Header,
        manifest: &Manifest,
        state: &T,
        hint: usize,
    ) -> Result<(OwnedFd, usize), SnapshotError> {
        let prefix = encode_prefix(header, manifest)?;
        let at = HEADER_LEN + prefix.bytes.len();
        let mapped = self.map.take().filter(|m| m.as_slice().len() > at);
        let encoded = match mapped {
            Some(mut map) => {
                let used =
                    postcard::to_slice(state, &mut map.as_mut_slice()[at..]).map(|u| u.len());
                match used {
                    Ok(len) => Some((map, len)),
                    Err(postcard::Error::SerializeBufferFull) => None,
                    Err(source) => return Err(encode_err(source)),
                }
            }
            None => None,
        };
        let Some((mut map, len)) = encoded else {
            // No room prepared (or the state outgrew it): a buffer, then write.
            let payload = encode_state_with_capacity(state, hint.saturating_mul(2))?;
            let fd = write_and_seal(self.file, header, &prefix, &payload)?;
            return Ok((fd, payload.len()));
        };
        let head = finish_head(header, &prefix, &map.as_slice()[at..at + len])?;
        let bytes = map.as_mut_slice();
        bytes[..HEADER_LEN].copy_from_slice(&head);
        bytes[HEADER_LEN..at].copy_from_slice(&prefix.bytes);
        // Unmapped before sealing: F_SEAL_WRITE is refused while a writable
        // shared mapping exists.
        drop(map);
        Ok((cut_and_seal(self.file, (at + len) as u64)?, len))
    }
}

/// Writes header, prefix and payload into `file`, then cuts and seals it.
fn write_and_seal(
    file: File,
    header: &Header,
    prefix: &Prefix,
    payload: &[u8],
) -> Result<OwnedFd, SnapshotError> {
    let head = finish_head(header, prefix, payload)?;
    let at = (head.len() + prefix.bytes.len()) as u64;
    file.write_all_at(&head, 0).map_err(io_err("write"))?;
    file.write_all_at(&prefix.bytes, head.len() as u64)
        .map_err(io_err("write"))?;
    file.write_all_at(payload, at).map_err(io_err("write"))?;
    cut_and_seal(file, at + payload.len() as u64)
}

/// Writes `bytes` into a new memfd named `name` and seals it, like a
/// snapshot (for the other sealed records that cross the exec).
pub(crate) fn seal_bytes(name: &std::ffi::CStr, bytes: &[u8]) -> Result<OwnedFd, SnapshotError> {
    let file = File::from(sys::memfd_create(name).map_err(io_err("create a memfd"))?);
    file.write_all_at(bytes, 0).map_err(io_err("write"))?;
    cut_and_seal(file, bytes.len() as u64)
}

/// Cuts the memfd to `total` bytes (dropping any unused reserve) and adds
/// the seals ([`sys::SEALS`]).
fn cut_and_seal(file: File, total: u64) -> Result<OwnedFd, SnapshotError> {
    file.set_len(total).map_err(io_err("size"))?;
    sys::seal(file, &sys::SEALS).map_err(io_err("seal"))
}

/// Reads and checks a snapshot from a memfd: seals first, then [`decode`]'s
/// checks, on a read-only mapping of the memfd (no copy; the file offset,
/// shared with whoever else holds the descriptor, is neither used nor
/// moved).
///
/// # Errors
///
/// [`SnapshotError::NotSealed`] for a descriptor that is not a sealed memfd,
/// and every error [`decode`] returns.
///
/// [`decode`]: super::format::decode
pub fn read_sealed(fd: BorrowedFd<'_>) -> Result<Snapshot, SnapshotError> {
    let sealed = sys::check_sealed(fd).map_err(not_sealed)?;
    let size = sys::file_size(fd).map_err(io_err("stat"))?;
    let size = usize::try_from(size).map_err(|_| SnapshotError::Corrupt {
        what: "a size beyond the address space".into(),
    })?;
    if size < HEADER_LEN {
        return Err(SnapshotError::Truncated {
            expected: HEADER_LEN as u64,
            found: size as u64,
        });
    }
    let map = sys::map_sealed(sealed, size).map_err(io_err("map"))?;
    let (header, manifest, payload) = parse(&map)?;
    Ok(Snapshot {
        header,
        manifest,
        payload: Payload::Mapped(map, payload),
    })
}

/// Checks that `fd` is a memfd carrying all four seals (shrink, grow,
/// write, seal), as every snapshot does: the one check the restore, the
/// probe and the rollback make (the same as [`read_sealed`]'s).
///
/// # Errors
///
/// [`SnapshotError::NotSealed`] saying what is missing.
pub fn check_sealed(fd: BorrowedFd<'_>) -> Result<(), SnapshotError> {
    sys::check_sealed(fd).map(drop).map_err(not_sealed)
}

/// The error for a descriptor that [`sys::check_sealed`] refused.
fn not_sealed(e: io::Error) -> SnapshotError {
    SnapshotError::NotSealed {
        detail: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::format::tests::sample;
    use super::super::format::{decode_state, encode, encode_state_with_capacity};
    use super::*;

    #[test]
    fn round_trip_through_a_sealed_memfd() {
        let (h, m, p) = sample();
        let fd = write_sealed(&h, &m, &p).unwrap();
        let snap = read_sealed(fd.as_fd()).unwrap();
        assert_eq!(snap.header, h);
        assert_eq!(snap.manifest, m);
        let state: (String, u32) = decode_state(snap.payload(), 3).unwrap();
        assert_eq!(state, ("hello".to_string(), 42));
        assert_eq!(snap.encoded_len(), encode(&h, &m, &p).unwrap().len());
    }

    #[test]
    fn a_draft_with_a_larger_reserve_is_cut_to_size() {
        let (h, m, p) = sample();
        let fd = Draft::new(1 << 20).unwrap().seal(&h, &m, &p).unwrap();
        let snap = read_sealed(fd.as_fd()).unwrap();
        assert_eq!(snap.payload(), &p[..]);
        let again = encode_state_with_capacity(&("hello", 42u32), 1).unwrap();
        assert_eq!(again, p);
    }

    #[test]
    fn a_state_encoded_straight_into_the_memfd_reads_back() {
        let (h, m, _) = sample();
        let state = ("hello", 42u32, vec![7u8; 100_000]);
        for reserve in [0, 1000, 1 << 20] {
            let (fd, len) = Draft::new(reserve)
                .unwrap()
                .seal_state(&h, &m, &state, 10)
                .unwrap();
            let snap = read_sealed(fd.as_fd()).unwrap();
            assert_eq!(snap.payload().len(), len, "reserve {reserve}");
            let back: (String, u32, Vec<u8>) = decode_state(snap.payload(), 3).unwrap();
            assert_eq!(back.2.len(), 100_000);
            assert_eq!(snap.manifest, m);
        }
    }

    #[test]
    fn a_sealed_memfd_cannot_be_written() {
        let (h, m, p) = sample();
        let file = File::from(write_sealed(&h, &m, &p).unwrap());
        assert!(file.write_all_at(b"X", 0).is_err());
        assert!(file.set_len(1).is_err());
    }

    #[test]
    fn unsealed_memfd_and_plain_file_are_refused() {
        let fd = sys::memfd_create(c"t").unwrap();
        let err = read_sealed(fd.as_fd()).unwrap_err();
        assert!(matches!(err, SnapshotError::NotSealed { .. }), "{err}");
        let f = File::open("/proc/self/stat").unwrap();
        let err = read_sealed(f.as_fd()).unwrap_err();
        assert!(err.to_string().contains("not a memfd"), "{err}");
    }
}
