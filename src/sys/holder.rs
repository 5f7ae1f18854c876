//! The holder: a child that keeps the old image alive across the commit's
//! exec, in case the new image dies before it can roll back by itself.
//!
//! # What it holds
//!
//! Just before the exec, the old image makes a child with
//! `clone(CLONE_VM | CLONE_FILES)`. It shares the old address space and
//! the old descriptor table. At the exec the kernel gives the executing
//! process a copy of the table (then closes its close-on-exec entries) and
//! a fresh address space, so afterwards the holder alone has:
//!
//! * **every descriptor of the old image**, close-on-exec ones included:
//!   the new image's rollback takes back from it (with `pidfd_getfd`) any
//!   client socket the failed image closed;
//! * **the old memory**: the exec only drops a reference to it, and its
//!   teardown (4 ms for 64 MiB, 60 ms for 1 GiB) happens when the holder
//!   exits, in the holder, outside the blackout.
//!
//! # What it does
//!
//! It blocks every signal and waits on a pidfd of the server's PID, with
//! the **upgrade's deadline** as its timeout, counted from just before the
//! exec. The image that declares itself ready (the new one, or the old one
//! after a rollback) takes the readiness claim (see `sys::claim`), then
//! kills the holder with SIGKILL and reaps it. Otherwise the holder
//! **rescues**: it executes the old binary in rollback mode with the old
//! descriptors and the sealed snapshot, in two cases:
//!
//! * the server's process dies first (SIGKILL, the OOM killer, a crash in
//!   the dynamic loader or the Rust runtime before `boot` could arm a
//!   rollback);
//! * the deadline passes and the holder takes the claim: the server's
//!   process never became ready (it hangs before `main`, in a library
//!   constructor, in a wrapper script that does something else outside
//!   the probe, or it is stopped, or it blocks SIGALRM). The holder kills
//!   it with SIGKILL through the pidfd, waits for its end, and rescues.
//!
//! The clients keep their connections; the server has a new PID (the
//! holder's).
//!
//! # Correct order of handling
//!
//! Until the exec the holder shares the old image's memory, allocator and
//! locks, and even its thread's TLS (errno): it only makes raw syscalls on
//! data prepared before the clone, and never allocates, locks or unwinds.
//! Everything it needs (argument and environment vectors, the handoff
//! variable with a slot for its own PID) is built by [`spawn`]. The old
//! image frees none of it: after a successful exec the memory is the
//! holder's, and after a failed one [`Holder::abort`] kills and reaps the
//! holder before freeing.

use std::ffi::{CString, c_char, c_int, c_void};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::ptr;

use super::claim::{Taken, take_raw};
use super::syscall;

/// Stack of the holder: it only calls a few syscalls.
const STACK_LEN: usize = 64 * 1024;

/// How soon the holder tries again a step of its deadline that failed (the
/// claim's read, the kill).
const RETRY_NS: u64 = 10_000_000;

/// How many times the holder tries to kill the unready image (a second's
/// worth) before it gives up and ends.
const KILL_TRIES: u32 = 100;

/// `CLOCK_MONOTONIC` in nanoseconds, by a raw `syscall(2)` (see
/// `holder_main`).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a local.
    unsafe {
        libc::syscall(
            libc::SYS_clock_gettime,
            libc::CLOCK_MONOTONIC,
            &mut ts as *mut libc::timespec,
        )
    };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// What the holder executes if the new image dies before it is ready.
pub(crate) struct HolderSpec {
    /// The old binary, not close-on-exec.
    pub binary_fd: RawFd,
    /// The old image's argument vector.
    pub argv: Vec<CString>,
    /// The environment (`NAME=value`), without the handoff variable and
    /// the rollback's reason.
    pub env: Vec<CString>,
    /// The reason entry (`COPYOVER_ROLLBACK_REASON=...`) of a rescue after
    /// the server's process died.
    pub died: CString,
    /// The reason entry of a rescue after the deadline passed.
    pub late: CString,
    /// The readiness claim's read end (see `sys::claim`), not close-on-exec.
    pub claim_fd: RawFd,
    /// How long the upgrade may take, from the holder's start, before the
    /// holder takes the claim and ends it.
    pub deadline: std::time::Duration,
    /// The handoff variable's text before the PID: `COPYOVER_HANDOFF=1:pid=`.
    pub var_prefix: String,
    /// The rest of it after the PID: `:snapshot=..:binary=..:mode=rollback...`.
    pub var_suffix: String,
    /// The signal mask the rescued image starts with (the held signals).
    pub blocked: Vec<c_int>,
}

struct Plan {
    parent_pidfd: RawFd,
    binary_fd: RawFd,
    claim_fd: RawFd,
    deadline_ns: u64,
    argv: Vec<*const c_char>,
    /// The last entry before the handoff variable is the reason: `died`,
    /// replaced by `late` when the deadline passed.
    envp: Vec<*const c_char>,
    reason_at: usize,
    late: *const c_char,
    /// The handoff variable: the prefix, a slot for up to 20 digits, the
    /// suffix and a NUL, all written by the holder when it rescues.
    var: Box<[u8]>,
    prefix_len: usize,
    suffix: Box<[u8]>,
    blocked: libc::sigset_t,
    _strings: Vec<CString>,
}

/// A running holder, seen from the old image before its exec.
#[derive(Debug)]
pub(crate) struct Holder {
    pid: i32,
    plan: *mut Plan,
    stack: *mut c_void,
    parent_pidfd: OwnedFd,
}

/// Starts a holder. The caller has made every descriptor the rescue needs
/// inheritable and blocked the held signals; it then executes the new image,
/// or calls [`Holder::abort`] if the exec fails.
pub(crate) fn spawn(spec: HolderSpec) -> io::Result<Holder> {
    // SAFETY: getpid cannot fail.
    let me = unsafe { libc::getpid() };
    let parent_pidfd = super::pidfd_open(me)?;

    let prefix = spec.var_prefix.into_bytes();
    let suffix = spec.var_suffix.into_bytes().into_boxed_slice();
    let mut var = vec![0u8; prefix.len() + 20 + suffix.len() + 1].into_boxed_slice();
    var[..prefix.len()].copy_from_slice(&prefix);

    let mut argv: Vec<*const c_char> = spec.argv.iter().map(|s| s.as_ptr()).collect();
    argv.push(ptr::null());
    let mut envp: Vec<*const c_char> = spec.env.iter().map(|s| s.as_ptr()).collect();
    let reason_at = envp.len();
    envp.push(spec.died.as_ptr());
    envp.push(var.as_ptr().cast());
    envp.push(ptr::null());
    let late = spec.late.as_ptr();
    let mut strings = spec.argv;
    strings.extend(spec.env);
    strings.push(spec.died);
    strings.push(spec.late);

    // SAFETY: a zeroed sigset_t is then initialised by sigemptyset.
    let mut blocked: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigemptyset/sigaddset fill a local sigset_t.
    unsafe { libc::sigemptyset(&mut blocked) };
    for &sig in &spec.blocked {
        // SAFETY: as above.
        unsafe { libc::sigaddset(&mut blocked, sig) };
    }
    let plan = Box::into_raw(Box::new(Plan {
        parent_pidfd: parent_pidfd.as_raw_fd(),
        binary_fd: spec.binary_fd,
        claim_fd: spec.claim_fd,
        deadline_ns: u64::try_from(spec.deadline.as_nanos()).unwrap_or(u64::MAX),
        argv,
        envp,
        reason_at,
        late,
        var,
        prefix_len: prefix.len(),
        suffix,
        blocked,
        _strings: strings,
    }));

    // SAFETY: a fresh private anonymous mapping; checked for MAP_FAILED.
    let stack = unsafe {
        libc::mmap(
            ptr::null_mut(),
            STACK_LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        let err = io::Error::last_os_error();
        // SAFETY: `plan` came from Box::into_raw above and nobody else has it.
        drop(unsafe { Box::from_raw(plan) });
        return Err(err);
    }
    // SAFETY: `holder_main` only makes raw syscalls on `plan`, which stays
    // valid and unchanged for the holder's whole life (see the module docs);
    // the stack is a fresh mapping of STACK_LEN bytes whose top we pass
    // (stacks grow down on every Linux architecture Rust supports but
    // PA-RISC). SIGCHLD makes it an ordinary child we reap.
    let pid = unsafe {
        syscall!(clone(
            holder_main,
            stack.cast::<u8>().add(STACK_LEN).cast(),
            libc::CLONE_VM | libc::CLONE_FILES | libc::SIGCHLD,
            plan.cast(),
        ))
    };
    match pid {
        Ok(pid) => Ok(Holder {
            pid,
            plan,
            stack,
            parent_pidfd,
        }),
        Err(e) => {
            // SAFETY: no holder runs: the plan and the stack are ours again.
            unsafe {
                libc::munmap(stack, STACK_LEN);
                drop(Box::from_raw(plan));
            }
            Err(e)
        }
    }
}

impl Holder {
    /// The holder's PID (written into the handoff variable).
    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    /// Waits for the holder's end, without killing it: after a failed exec
    /// that came too late, the holder took the readiness claim and is
    /// killing this process to rescue it. Returns only if the holder ended
    /// some other way.
    pub(crate) fn outlive(&self) {
        loop {
            // SAFETY: a zeroed siginfo_t is a valid value for waitid to fill.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: `pid` is our unreaped child; WNOWAIT leaves it for
            // `abort` to reap; `info` is a valid siginfo_t.
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    self.pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return;
            }
        }
    }

    /// Kills and reaps the holder after a failed exec, then frees what it
    /// used. Its exit is cheap: it shares this image's memory.
    pub(crate) fn abort(self) {
        // SAFETY: `pid` is our unreaped child, so the number cannot have
        // been reused; kill and waitpid take plain integers.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            let mut status = 0;
            while libc::waitpid(self.pid, &mut status, 0) == -1
                && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
            {}
        }
        // SAFETY: the holder is reaped: nothing else uses the plan or the
        // stack any more.
        unsafe {
            libc::munmap(self.stack, STACK_LEN);
            drop(Box::from_raw(self.plan));
        }
        drop(self.parent_pidfd);
    }
}

/// The holder's body. Raw syscalls only (see the module docs).
extern "C" fn holder_main(arg: *mut c_void) -> c_int {
    // Every call below is `syscall(2)` itself, not a libc wrapper: the
    // wrappers of blocking calls are cancellation points that update the
    // calling thread's descriptor, which the holder shares with the old
    // image's thread until the exec. `syscall` touches nothing but errno,
    // and only on failure.
    // SAFETY: `arg` is the plan `spawn` leaked for the holder's life.
    let plan = unsafe { &mut *arg.cast::<Plan>() };
    // The kernel's signal set is 8 bytes: the first word of a sigset_t.
    const KSIGSET: libc::c_long = 8;
    // SAFETY: a full sigset, initialised by sigfillset, read by the kernel.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &all as *const libc::sigset_t,
            ptr::null_mut::<libc::sigset_t>(),
            KSIGSET,
        );
    }
    let mut pfd = libc::pollfd {
        fd: plan.parent_pidfd,
        events: libc::POLLIN,
        revents: 0,
    };
    // Watching: until the deadline. Then, with the claim, killing (again
    // every 10 ms until the kill is sent), then waiting for the end; without
    // it (the image is ready and kills us), just waiting.
    let mut until = Some(monotonic_ns().saturating_add(plan.deadline_ns));
    let mut claimed = false;
    let mut late = false;
    let mut failed_kills = 0u32;
    loop {
        let now = monotonic_ns();
        let timeout = until.map(|u| {
            let left = u.saturating_sub(now);
            libc::timespec {
                tv_sec: (left / 1_000_000_000).min(i32::MAX as u64) as libc::time_t,
                tv_nsec: (left % 1_000_000_000) as libc::c_long,
            }
        });
        let ts = timeout
            .as_ref()
            .map_or(ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: one valid pollfd, a valid timespec or none, no signal
        // mask change.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_ppoll,
                &mut pfd as *mut libc::pollfd,
                1 as libc::c_ulong,
                ts,
                ptr::null::<libc::sigset_t>(),
                KSIGSET,
            )
        };
        if rc > 0 {
            break;
        }
        if until.is_none_or(|u| monotonic_ns() < u) {
            continue;
        }
        if !claimed {
            match take_raw(plan.claim_fd) {
                Taken::Ours => claimed = true,
                // The image is ready, and about to kill us.
                Taken::Gone => {
                    until = None;
                    continue;
                }
                Taken::Failed(_) => {
                    until = Some(monotonic_ns().saturating_add(RETRY_NS));
                    continue;
                }
            }
        }
        // SAFETY: plain integers and a NULL siginfo; the pidfd names the
        // server's process, never another that reused its number.
        let sent = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                plan.parent_pidfd,
                libc::SIGKILL,
                ptr::null::<libc::siginfo_t>(),
                0,
            )
        } == 0;
        if sent {
            late = true;
            until = None;
        } else if failed_kills >= KILL_TRIES {
            // It cannot be killed (a new image that took other
            // credentials, say): with the claim taken, the image waits for
            // this holder's end to serve on; end here.
            let msg = b"copyover: the holder could not kill the unready new image; leaving it\n";
            // SAFETY: writes a static message; exit_group ends only the
            // holder, a process of its own.
            unsafe {
                libc::syscall(libc::SYS_write, 2, msg.as_ptr(), msg.len());
                libc::syscall(libc::SYS_exit_group, 71);
            }
        } else {
            failed_kills += 1;
            until = Some(monotonic_ns().saturating_add(RETRY_NS));
        }
    }
    if late {
        plan.envp[plan.reason_at] = plan.late;
    }
    // The claim served its purpose; the rescued image has no holder and
    // would not know it. (The holder's table is its own since the exec.)
    // SAFETY: closes one fd of the holder's own table; nothing else uses it.
    unsafe { libc::syscall(libc::SYS_close, plan.claim_fd) };
    // The server's process is gone before any image said it was ready:
    // bring the old binary back here, with everything.
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::syscall(libc::SYS_getpid) } as u64;
    // The slot after the prefix has room for 20 digits (see `spawn`).
    let at = plan.prefix_len + super::write_decimal(&mut plan.var[plan.prefix_len..], pid);
    plan.var[at..at + plan.suffix.len()].copy_from_slice(&plan.suffix);
    plan.var[at + plan.suffix.len()] = 0;
    // SAFETY: the mask is initialised; argv and envp are NULL-terminated
    // arrays of NUL-terminated strings in the plan; "" with AT_EMPTY_PATH
    // executes the old binary's descriptor. exit_group ends only the
    // holder, a process of its own.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &plan.blocked as *const libc::sigset_t,
            ptr::null_mut::<libc::sigset_t>(),
            KSIGSET,
        );
        super::execveat_prepared(plan.binary_fd, plan.argv.as_ptr(), plan.envp.as_ptr());
        let msg = b"copyover: the holder could not start the old binary again\n";
        libc::syscall(libc::SYS_write, 2, msg.as_ptr(), msg.len());
        libc::syscall(libc::SYS_exit_group, 70);
    }
    70
}
