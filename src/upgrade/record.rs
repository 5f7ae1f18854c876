//! The exec record: how the old image was started (its argument vector and
//! environment), sealed in a memfd that crosses the commit's exec, so that a
//! rollback starts the old binary exactly as it ran.

use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;

/// How the old image was started: its argument vector and environment
/// (without the handoff variable), written by the commit into a sealed memfd
/// (`exec=FD` in the handoff variable).
///
/// # Format, version 1
///
/// `copyover-exec 1\n`, the argument count as a little-endian `u32`, then
/// every argument and every `NAME=value` entry, each ended by a NUL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExecRecord {
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
}

const RECORD_MAGIC: &[u8] = b"copyover-exec 1\n";

impl ExecRecord {
    pub(crate) fn encode(argv: &[CString], env: &[CString]) -> Vec<u8> {
        let mut out = RECORD_MAGIC.to_vec();
        out.extend_from_slice(&(argv.len() as u32).to_le_bytes());
        for s in argv.iter().chain(env) {
            out.extend_from_slice(s.as_bytes_with_nul());
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<ExecRecord> {
        let rest = bytes.strip_prefix(RECORD_MAGIC)?;
        let (count, rest) = rest.split_first_chunk::<4>()?;
        let argc = u32::from_le_bytes(*count) as usize;
        let body = rest.strip_suffix(b"\0").unwrap_or(rest);
        let mut parts: Vec<&[u8]> = if rest.is_empty() {
            Vec::new()
        } else {
            body.split(|b| *b == 0).collect()
        };
        if parts.len() < argc || rest.last().is_some_and(|b| *b != 0) {
            return None;
        }
        let env = parts.split_off(argc);
        Some(ExecRecord {
            argv: parts
                .into_iter()
                .map(|a| CString::new(a).ok())
                .collect::<Option<_>>()?,
            env: env
                .into_iter()
                .map(|e| CString::new(e).ok())
                .collect::<Option<_>>()?,
        })
    }

    /// Encodes the record of `argv` and `env` (`NAME=value` entries) into a
    /// new sealed memfd: the one way a record is made (the probe makes it
    /// ahead; the commit, if the probe could not).
    pub(crate) fn seal(
        argv: &[CString],
        env: &[CString],
    ) -> Result<OwnedFd, crate::snapshot::SnapshotError> {
        crate::snapshot::seal_bytes(c"copyover-exec", &ExecRecord::encode(argv, env))
    }

    /// Reads the record from its sealed memfd.
    pub(crate) fn read(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<ExecRecord> {
        crate::snapshot::check_sealed(fd).map_err(io::Error::other)?;
        let len = crate::sys::file_size(fd)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l <= 1 << 24)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "an oversized exec record")
            })?;
        let mut bytes = vec![0u8; len];
        let mut at = 0;
        while at < len {
            match crate::sys::read_at(fd, &mut bytes[at..], at as u64)? {
                0 => break,
                n => at += n,
            }
        }
        bytes.truncate(at);
        ExecRecord::decode(&bytes)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "a malformed exec record"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::cstring;

    #[test]
    fn an_exec_record_round_trips_and_refuses_garbage() {
        let argv = vec![
            cstring(b"/srv/chat").unwrap(),
            cstring(b"--listen").unwrap(),
        ];
        let env = vec![cstring(b"A=1").unwrap(), cstring(b"EMPTY=").unwrap()];
        let bytes = ExecRecord::encode(&argv, &env);
        let back = ExecRecord::decode(&bytes).unwrap();
        assert_eq!(back.argv, argv);
        assert_eq!(back.env, env);
        let none = ExecRecord::decode(&ExecRecord::encode(&[], &[])).unwrap();
        assert!(none.argv.is_empty() && none.env.is_empty());
        assert!(ExecRecord::decode(b"garbage").is_none());
        assert!(ExecRecord::decode(&bytes[..bytes.len() - 1]).is_none());
        let mut short = RECORD_MAGIC.to_vec();
        short.extend_from_slice(&9u32.to_le_bytes());
        short.extend_from_slice(b"a\0");
        assert!(ExecRecord::decode(&short).is_none());
    }

    #[test]
    fn an_exec_record_is_read_back_from_its_sealed_memfd() {
        use std::os::fd::AsFd;
        let argv = vec![cstring(b"/srv/chat").unwrap(), cstring(b"-v").unwrap()];
        let env = [cstring(b"A=1").unwrap()];
        let fd = ExecRecord::seal(&argv, &env).unwrap();
        let back = ExecRecord::read(fd.as_fd()).unwrap();
        assert_eq!(back.argv, argv);
        assert_eq!(back.env, [cstring(b"A=1").unwrap()]);
    }

    #[test]
    fn an_oversized_exec_record_is_refused() {
        use std::os::fd::AsFd;
        // One argument of 16 MiB: the record is over the 16 MiB cap.
        let argv = [cstring(&vec![b'a'; 1 << 24]).unwrap()];
        let fd = ExecRecord::seal(&argv, &[]).unwrap();
        let err = ExecRecord::read(fd.as_fd()).unwrap_err();
        assert!(err.to_string().contains("oversized"), "{err}");
    }
}
