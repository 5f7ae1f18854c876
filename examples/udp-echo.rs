//! The subject of tests/crash.rs's datagram case, not a template: a UDP
//! echo server that keeps its socket in systemd's fd store, so that after a
//! crash the restarted server answers on the very same socket.
//!
//! It binds `127.0.0.1:0` on a first start, logs `listening
//! addr=127.0.0.1:PORT`, and answers each datagram with `echo N: TEXT`,
//! where N counts the datagrams answered since the first start (the state,
//! checkpointed after each one).

use std::error::Error;
use std::net::UdpSocket;
use std::os::fd::AsFd;

use copyover::{AppState, Config, Start};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Default)]
struct State {
    answered: u64,
}

impl AppState for State {
    const VERSION: u32 = 1;
}

fn main() -> Result<(), Box<dyn Error>> {
    // The log first: `boot` reports a recovery.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let (mut co, start) = copyover::boot::<State>(Config::new("udp-echo", "v1"))?;
    if !co.enable_fdstore() {
        return Err("not a systemd service (no NOTIFY_SOCKET): nothing to keep the socket".into());
    }
    let (mut state, socket) = match start {
        Start::Fresh => {
            let socket = UdpSocket::bind("127.0.0.1:0")?;
            co.store_fd("udp", socket.as_fd())?;
            (State::default(), socket)
        }
        Start::Resumed { state, mut fds } => {
            let socket = fds
                .take_udp_socket("udp")?
                .ok_or("the recovered descriptors hold no 'udp'")?;
            (state, socket)
        }
    };
    co.checkpoint(&state)?;
    co.ready()?;
    eprintln!("listening addr={}", socket.local_addr()?);
    let mut buf = [0u8; 1500];
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        state.answered += 1;
        co.checkpoint(&state)?;
        let text = String::from_utf8_lossy(&buf[..n]);
        socket.send_to(format!("echo {}: {text}", state.answered).as_bytes(), from)?;
    }
}
