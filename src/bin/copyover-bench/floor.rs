//! The physical floor of an upgrade's blackout, measured on this machine:
//! what the runtime cannot avoid doing per kept fd, writing and reading the
//! state through a memfd, and `execve` itself.

use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;
use std::time::Instant;

use crate::BoxError;
use crate::report::median;

/// What the runtime must do per kept fd, done on `fds`: clear
/// close-on-exec, check the socket (`SO_TYPE`, `SO_ACCEPTCONN`), add to a
/// fresh epoll. Milliseconds, median of three.
pub fn fd_floor(fds: &[TcpStream]) -> Result<f64, BoxError> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
    use nix::sys::socket::{getsockopt, sockopt};
    let mut runs = Vec::new();
    for _ in 0..3 {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let t = Instant::now();
        for s in fds {
            fcntl(s.as_fd(), FcntlArg::F_SETFD(FdFlag::empty()))?;
        }
        for s in fds {
            getsockopt(s, sockopt::SockType)?;
            getsockopt(s, sockopt::AcceptConn)?;
        }
        for s in fds {
            epoll.add(
                s,
                EpollEvent::new(EpollFlags::EPOLLIN, s.as_raw_fd() as u64),
            )?;
        }
        runs.push(t.elapsed().as_secs_f64() * 1e3);
        for s in fds {
            fcntl(s.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
        }
    }
    Ok(median(&runs))
}

/// A memfd write and a read back of `bytes`. Milliseconds, median of three.
pub fn memfd_floor(bytes: usize) -> Result<f64, BoxError> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    use std::os::unix::fs::FileExt;
    let data = vec![7u8; bytes];
    let mut runs = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let file = std::fs::File::from(memfd_create(c"floor", MFdFlags::MFD_CLOEXEC)?);
        file.write_all_at(&data, 0)?;
        let mut back = vec![0u8; bytes];
        file.read_exact_at(&mut back, 0)?;
        runs.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(&runs))
}

/// `execve` of this binary, from the call to its `main`: runs
/// `exec-floor`, which executes itself 200 times. Milliseconds per exec.
pub fn measure_exec_floor() -> Result<f64, BoxError> {
    let count = 200;
    let out = Command::new(std::env::current_exe()?)
        .arg("exec-floor")
        .env("COPYOVER_BENCH_EXECS", count.to_string())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let total_ns: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("exec-floor printed {text:?}"))?;
    Ok(total_ns / count as f64 / 1e6)
}

pub fn exec_floor() -> Result<(), BoxError> {
    let now = || {
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u128 * 1_000_000_000 + t.tv_nsec() as u128)
            .unwrap_or(0)
    };
    let left: u32 = std::env::var("COPYOVER_BENCH_EXECS")?.parse()?;
    let start: u128 = match std::env::var("COPYOVER_BENCH_EXEC_START") {
        Ok(s) => s.parse()?,
        Err(_) => now(),
    };
    if left == 0 {
        println!("{}", now() - start);
        return Ok(());
    }
    let exe = std::ffi::CString::new(
        std::env::current_exe()?
            .into_os_string()
            .into_encoded_bytes(),
    )?;
    let argv = [exe.clone(), c"exec-floor".into()];
    let env = [
        std::ffi::CString::new(format!("COPYOVER_BENCH_EXECS={}", left - 1))?,
        std::ffi::CString::new(format!("COPYOVER_BENCH_EXEC_START={start}"))?,
    ];
    Err(nix::unistd::execve(&exe, &argv, &env)
        .map(|_| ())
        .unwrap_err()
        .into())
}
