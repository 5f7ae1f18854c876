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
//! The region's memfd is close-on-exec and never given to a child (not even
//! the probe), so its pages are written by this process only. Like any
//! memory, it can still be reached by a process of the same user through
//! `/proc/PID/fd` or `/proc/PID/mem`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::error::Error;
use crate::sys;

/// A memfd-backed byte buffer that survives upgrades in place.
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
        let fd = sys::memfd_create(c"copyover-region").map_err(setup("create a region memfd"))?;
        let file = std::fs::File::from(fd);
        file.set_len(len as u64).map_err(setup("size a region"))?;
        let fd = OwnedFd::from(file);
        let map = sys::map_region(fd.as_fd(), len, false).map_err(setup("map a region"))?;
        Ok(Region { map, fd })
    }

    /// Maps an inherited region's memfd (after checking that it is one).
    pub(crate) fn adopt(fd: OwnedFd) -> Result<Region, std::io::Error> {
        nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_GET_SEALS)
            .map_err(|_| std::io::Error::other("it is not a memfd"))?;
        let len = nix::sys::stat::fstat(fd.as_fd())?.st_size;
        let len = usize::try_from(len).map_err(|_| std::io::Error::other("negative size"))?;
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

impl AsFd for Region {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

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
    }
}
