//! File I/O that no planted file can redirect or block: the directory's
//! checks, writes through a fresh name, bounded reads.

use super::*;

/// Creates `dir` (mode 0700) if needed, and checks that it is a directory
/// (not a symlink) owned by this user that nobody else can write to.
pub(super) fn check_dir(dir: &Path) -> io::Result<()> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    let uid = crate::sys::effective_uid();
    let refuse = |why: String| Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
    if !meta.file_type().is_dir() {
        return refuse(format!("{} is not a directory", dir.display()));
    }
    if meta.uid() != uid {
        return refuse(format!(
            "{} belongs to uid {}, not to this process's uid {uid}: remove it or set {STATUS_DIR_VAR}",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return refuse(format!(
            "{} can be written by others (mode {:o}): chmod 700 it or set {STATUS_DIR_VAR}",
            dir.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Writes `bytes` to a fresh file in `dir` (`O_EXCL|O_NOFOLLOW`, mode
/// 0600), optionally fsyncs it, and renames it over `path`: readers see the
/// old file or the new one, and nothing planted at either name is followed.
pub(crate) fn write_replacing(dir: &Path, path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}.{:x}.tmp",
        std::process::id(),
        crate::sys::monotonic_ns()
    ));
    write_through(&tmp, path, bytes, sync)
}

/// [`write_replacing`] through the temporary name `tmp`: created new
/// (`O_CREAT|O_EXCL`, so nothing planted there is reused or followed, and
/// `O_NOFOLLOW` besides), written, renamed over `path` (a symlink planted at
/// `path` is replaced, never followed).
pub(super) fn write_through(tmp: &Path, path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(tmp)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| if sync { file.sync_all() } else { Ok(()) });
    // Closed before it appears under its name: whoever sees the new file
    // (and counts this process's descriptors) sees the final ones.
    drop(file);
    let written = written.and_then(|()| std::fs::rename(tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    written
}

/// Reads a small regular file without following a symlink or blocking on a
/// FIFO, and at most [`MAX_LEN`] bytes.
pub(super) fn read_bounded(path: &Path) -> io::Result<String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    let mut text = String::new();
    file.take(MAX_LEN).read_to_string(&mut text)?;
    Ok(text)
}
