//! The received descriptors put back at the numbers they had in the old
//! process, so that what refers to a descriptor by its number stays true
//! across a migration as across an exec: an epoll instance kept in the
//! handoff (its registrations are keyed by file *and number*), a number
//! kept in the state.
//!
//! `SCM_RIGHTS` installs them at the lowest free numbers. Each is moved with
//! `F_DUPFD_CLOEXEC` from its target up, which never closes anything: it
//! lands on the target if that is free, and higher otherwise (then the old
//! number stays, and the caller is told). Two calls a descriptor (the move
//! and the close of the received number), a third for each cycle of
//! descriptors that sit on each other's targets.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use crate::sys;

/// Moves `fds[i]` to `targets[i]`, each where it can. `obstacles` are this
/// process's own descriptors of the migration (its socket, the snapshot, the
/// old process's pidfd): moved out of the way first, above every target.
/// Returns the descriptors in the same order, and whether every one is at
/// its target.
pub(super) fn keep_numbers(
    fds: Vec<OwnedFd>,
    targets: &[RawFd],
    obstacles: &mut [&mut OwnedFd],
) -> (Vec<OwnedFd>, bool) {
    let Some(high) = targets.iter().max().map(|t| t.saturating_add(1)) else {
        return (fds, true);
    };
    if targets.len() != fds.len() || targets.iter().any(|t| *t < 3) {
        return (fds, false);
    }
    let is_target: std::collections::HashSet<RawFd> = targets.iter().copied().collect();
    if is_target.len() != targets.len() {
        return (fds, false);
    }
    let mut kept = true;
    for fd in obstacles.iter_mut() {
        if is_target.contains(&fd.as_raw_fd()) {
            match sys::dup_at_least(fd.as_fd(), high) {
                Ok(moved) => **fd = moved,
                Err(_) => kept = false,
            }
        }
    }
    let mut fds: Vec<OwnedFd> = fds;
    // Where each descriptor not yet at its target is, by number.
    let mut at: HashMap<RawFd, usize> = fds
        .iter()
        .enumerate()
        .filter(|(i, fd)| fd.as_raw_fd() != targets[*i])
        .map(|(i, fd)| (fd.as_raw_fd(), i))
        .collect();
    let mut placed: Vec<bool> = fds
        .iter()
        .zip(targets)
        .map(|(fd, t)| fd.as_raw_fd() == *t)
        .collect();
    for start in 0..fds.len() {
        if placed[start] {
            continue;
        }
        // The chain of descriptors each sitting on the previous one's
        // target; it ends at a free target, or comes back to `start`.
        let mut chain = vec![start];
        let mut cur = start;
        while let Some(&next) = at.get(&targets[cur]) {
            if next == start {
                // A cycle: `start` steps aside first.
                at.remove(&fds[start].as_raw_fd());
                match sys::dup_at_least(fds[start].as_fd(), high) {
                    Ok(moved) => fds[start] = moved,
                    Err(_) => kept = false,
                }
                break;
            }
            chain.push(next);
            cur = next;
        }
        for &i in chain.iter().rev() {
            let from = fds[i].as_raw_fd();
            match sys::dup_at_least(fds[i].as_fd(), targets[i]) {
                Ok(moved) if moved.as_raw_fd() == targets[i] => {
                    at.remove(&from);
                    // The received number closes here.
                    fds[i] = moved;
                    placed[i] = true;
                }
                // Taken by something else: it stays where it is, and so
                // does every descriptor of the chain before it.
                Ok(_) | Err(_) => {
                    kept = false;
                    break;
                }
            }
        }
    }
    (fds, kept && placed.iter().all(|p| *p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ino(fd: &impl AsFd) -> u64 {
        nix::sys::stat::fstat(fd.as_fd()).unwrap().st_ino
    }

    /// Pipes' ends, each a distinct file to tell apart by inode.
    fn files(n: usize) -> Vec<OwnedFd> {
        (0..n)
            .flat_map(|_| {
                let (r, w) = nix::unistd::pipe().unwrap();
                [r, w]
            })
            .take(n)
            .collect()
    }

    #[test]
    fn each_lands_on_its_target_through_chains_and_cycles() {
        // Numbers far above what the test harness uses, in a block: the
        // received ones sit on each other's targets (a cycle of three, a
        // chain of two into a free number) and one is already in place.
        let base = 3000;
        let fds = files(6);
        let put = |fd: &OwnedFd, n: RawFd| sys::dup_at_least(fd.as_fd(), n).unwrap();
        let at: Vec<RawFd> = vec![base, base + 1, base + 2, base + 3, base + 4, base + 5];
        let received: Vec<OwnedFd> = fds.iter().zip(&at).map(|(f, n)| put(f, *n)).collect();
        assert_eq!(
            received.iter().map(|f| f.as_raw_fd()).collect::<Vec<_>>(),
            at
        );
        // 0 -> 1's number, 1 -> 2's, 2 -> 0's (a cycle); 3 -> 4's number,
        // 4 -> a free one (a chain); 5 stays.
        let targets = [base + 1, base + 2, base, base + 4, base + 10, base + 5];
        let want: Vec<u64> = fds.iter().map(ino).collect();
        let mut socket = put(&fds[0], base + 20);
        let (moved, kept) = keep_numbers(received, &targets, &mut [&mut socket]);
        assert!(kept);
        assert_eq!(
            moved.iter().map(|f| f.as_raw_fd()).collect::<Vec<_>>(),
            targets
        );
        assert_eq!(moved.iter().map(ino).collect::<Vec<_>>(), want);
        // Nothing left at the received numbers but the targets reused.
        assert!(sys::is_cloexec(base + 3).is_err());
    }

    #[test]
    fn a_target_taken_by_something_else_leaves_that_one_where_it_was() {
        let base = 3100;
        let fds = files(2);
        let put = |fd: &OwnedFd, n: RawFd| sys::dup_at_least(fd.as_fd(), n).unwrap();
        let received = vec![put(&fds[0], base), put(&fds[1], base + 1)];
        let foreign = put(&fds[0], base + 5);
        // An obstacle of ours on a target steps aside.
        let mut socket = put(&fds[1], base + 6);
        let targets = [base + 5, base + 6];
        let (moved, kept) = keep_numbers(received, &targets, &mut [&mut socket]);
        assert!(!kept);
        assert_eq!(moved[0].as_raw_fd(), base, "not moved onto a foreign fd");
        assert_eq!(moved[1].as_raw_fd(), base + 6);
        assert_ne!(socket.as_raw_fd(), base + 6);
        assert_eq!(ino(&foreign), ino(&fds[0]));
    }
}
