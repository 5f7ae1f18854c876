//! Regions: bulk state that crosses the exec without being serialized,
//! copied or even touched.
//!
//! A [`Region`] is a byte buffer backed by a memfd and mapped shared. At an
//! upgrade it goes into the [`Handoff`](crate::Handoff) like a socket
//! ([`Handoff::region`](crate::Handoff::region)); the new image maps the same
//! pages again ([`Inherited::take_region`](crate::Inherited::take_region)).
//! Nothing is encoded, written or read: a 1 GiB region costs the blackout
//! two `mmap` calls and the page-table teardown of the old mapping, not the
//! seconds a 1 GiB serialized state takes.
//!
//! Keep in a region what is big and plain: caches, buffers, arrays of
//! fixed-size records, an arena your own code lays out. Its layout is yours
//! to version, since no serde runs over it.
//!
//! # Soundness
//!
//! A region hands out `&[u8]` and `&mut [u8]` over shared memory, so
//! nothing else may change or resize that memory under a live slice:
//!
//! * the memfd is sealed against shrinking and growing
//!   (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`) as soon as it is sized, so
//!   no `ftruncate` can ever make a mapped page vanish (SIGBUS); an
//!   inherited region is adopted only if it carries these seals;
//! * its descriptor is private to the region (no `AsFd`): safe code cannot
//!   write it or resize it, and only the runtime puts it into a handoff;
//! * it is close-on-exec, so no child the application starts gets it (the
//!   probe neither). Only the runtime hands it on: it is inheritable at the
//!   commit's exec and at a rollback's, and the holder (the child the
//!   commit leaves behind, sharing the old image's descriptor table, to
//!   start the old binary again if the new image dies before it can roll
//!   back) keeps it until an image is ready.
//!
//! Like any memory, it can still be reached by a process of the same user
//! through `/proc/PID/fd` or `/proc/PID/mem`.
//!
//! # After a rollback
//!
//! A region is shared, not copied: the old image that comes back after a
//! rollback sees **whatever the failed new image wrote** into it before it
//! failed. Keep a region's layout versioned, and have a new image write to
//! it only after it has checked everything it needs (or after
//! [`Copyover::ready`](crate::Copyover::ready)).

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use memfd::{FileSeal, Memfd};

use crate::error::Error;
use crate::sys;

/// A memfd-backed byte buffer that survives upgrades in place.
///
/// # Example
///
/// A cache created on a fresh start, taken back by name after an upgrade,
/// and kept in the handoff like a socket:
///
/// ```
/// use copyover::{Handoff, Inherited, Region};
///
/// /// The inherited cache after an upgrade, else a new one.
/// fn cache(inherited: Option<&mut Inherited>) -> Result<Region, copyover::Error> {
///     if let Some(fds) = inherited {
///         if let Some(cache) = fds.take_region("cache")? {
///             return Ok(cache);
///         }
///     }
///     Region::new(1 << 20)
/// }
///
/// let mut cache = cache(None)?;
/// cache.as_mut_slice()[..5].copy_from_slice(b"hello");
/// assert_eq!(&cache.as_slice()[..5], b"hello");
/// // At the upgrade, beside the sockets:
/// let mut keep = Handoff::new();
/// keep.region("cache", &cache);
/// # Ok::<(), copyover::Error>(())
/// ```
#[derive(Debug)]
pub struct Region {
    map: sys::Mapping,
    fd: OwnedFd,
}

impl Region {
    /// Creates a zero-filled region of `len` bytes. Pages are allocated as
    /// they are first written.
    ///
    /// # Errors
    ///
    /// [`Error::Setup`] if the memfd cannot be created, sized or mapped.
    pub fn new(len: usize) -> Result<Region, Error> {
        let setup = |what| move |source| Error::Setup { what, source };
        // Created by `sys`, not `memfd::MemfdOptions`: the crate cannot ask
        // for MFD_NOEXEC_SEAL.
        let fd = sys::memfd_create(c"copyover-region").map_err(setup("create a region memfd"))?;
        let file = std::fs::File::from(fd);
        file.set_len(len as u64).map_err(setup("size a region"))?;
        let fd = sys::seal(file, &SIZE_SEALS).map_err(setup("seal a region's size"))?;
        let map = sys::map_region(fd.as_fd(), len, false).map_err(setup("map a region"))?;
        Ok(Region { map, fd })
    }

    /// Maps an inherited region's memfd, after checking that it is a memfd
    /// whose size is sealed.
    pub(crate) fn adopt(fd: OwnedFd) -> Result<Region, std::io::Error> {
        let memfd =
            Memfd::try_from_fd(fd).map_err(|_| std::io::Error::other("it is not a memfd"))?;
        let mut seals = memfd.seals().map_err(sys::memfd_io)?;
        if !seals.contains(&::memfd::FileSeal::SealSeal) {
            // A region made by an older release, before regions were
            // sealed: seal its size now, before mapping it.
            memfd.add_seals(&SIZE_SEALS).map_err(sys::memfd_io)?;
            seals = memfd.seals().map_err(sys::memfd_io)?;
        }
        if !SIZE_SEALS.iter().all(|s| seals.contains(s)) {
            return Err(std::io::Error::other(
                "its size is not sealed (F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_SEAL): it could shrink under the mapping",
            ));
        }
        let file = memfd.into_file();
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| std::io::Error::other("too large to map"))?;
        let fd = OwnedFd::from(file);
        let map = sys::map_region(fd.as_fd(), len, false)?;
        Ok(Region { map, fd })
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.map.as_slice().len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.map.as_slice()
    }

    /// The bytes, to write.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.map.as_mut_slice()
    }
}

impl Region {
    /// The memfd's number, for the handoff only (see "Soundness").
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The seals that fix a region's size for good. Not [`sys::SEALS`]: a
/// region stays writable.
const SIZE_SEALS: [FileSeal; 3] = [FileSeal::SealShrink, FileSeal::SealGrow, FileSeal::SealSeal];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_is_shared_through_its_memfd() {
        let mut r = Region::new(8192).unwrap();
        r.as_mut_slice()[..5].copy_from_slice(b"hello");
        let again = Region::adopt(r.fd.try_clone().unwrap()).unwrap();
        assert_eq!(&again.as_slice()[..5], b"hello");
        assert_eq!(again.len(), 8192);
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(Region::adopt(OwnedFd::from(file)).is_err());
        // Its size cannot change under the mapping.
        let f = std::fs::File::from(r.fd.try_clone().unwrap());
        assert!(f.set_len(4096).is_err(), "a region shrank");
        assert!(f.set_len(1 << 20).is_err(), "a region grew");
        // An unsealed memfd (a region of an older release) is sealed on
        // adoption; one sealed for good without its size fixed is refused.
        let loose = sys::memfd_create(c"loose").unwrap();
        let f = std::fs::File::from(loose.try_clone().unwrap());
        f.set_len(8192).unwrap();
        let adopted = Region::adopt(loose).unwrap();
        assert_eq!(adopted.len(), 8192);
        assert!(f.set_len(4096).is_err(), "an adopted region can shrink");
        let sealed = sys::memfd_create(c"sealed").unwrap();
        let f = std::fs::File::from(sealed.try_clone().unwrap());
        f.set_len(8192).unwrap();
        sys::seal(f, &[FileSeal::SealSeal]).unwrap();
        let err = Region::adopt(sealed).unwrap_err().to_string();
        assert!(err.contains("not sealed"), "{err}");
    }
}
