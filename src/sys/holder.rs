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
//! It blocks every signal and waits on a pidfd of the server's PID. The
//! image that declares itself ready (the new one, or the old one after a
//! rollback) kills it with SIGKILL and reaps it. If instead the server's
//! process dies first (SIGKILL, the OOM killer, a crash in the dynamic
//! loader or the Rust runtime before `boot` could arm a rollback), the
//! holder **rescues**: it executes the old binary in rollback mode with the
//! old descriptors and the sealed snapshot. The clients keep their
//! connections; the server has a new PID (the holder's).
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

use super::syscall;

/// Stack of the holder: it only calls a few syscalls.
const STACK_LEN: usize = 64 * 1024;

/// What the holder executes if the new image dies before it is ready.
pub(crate) struct HolderSpec {
    /// The old binary, not close-on-exec.
    pub binary_fd: RawFd,
    /// The old image's argument vector.
    pub argv: Vec<CString>,
    /// The environment (`NAME=value`), without the handoff variable.
    pub env: Vec<CString>,
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
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
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
    envp.push(var.as_ptr().cast());
    envp.push(ptr::null());
    let mut strings = spec.argv;
    strings.extend(spec.env);

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
        argv,
        envp,
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
    loop {
        // SAFETY: one valid pollfd, no timeout, no signal mask change.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_ppoll,
                &mut pfd as *mut libc::pollfd,
                1 as libc::c_ulong,
                ptr::null::<libc::timespec>(),
                ptr::null::<libc::sigset_t>(),
                KSIGSET,
            )
        };
        if rc > 0 {
            break;
        }
    }
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
