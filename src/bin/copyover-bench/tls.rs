//! `copyover-bench tls-records`: the record layer of `copyover::tls` beside
//! rustls's own, on the same messages, in one process.
//!
//! Both servers take the same configuration (`copyover::tls::Config`: its
//! ring record ciphers); a rustls client talks to each over memory. Sealing
//! is timed on the server (its writes, then its ciphertext taken out), and
//! opening too (the client's records fed in, the plaintext taken out). The
//! copyover side is the code that serves a session after an upgrade: the
//! same record layer, before and after the exec.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use copyover::tls::{Config, Connection};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConnection};

use crate::BoxError;

/// `copyover-bench tls-records`' options.
#[derive(Args)]
pub struct TlsArgs {
    /// Messages per direction and run.
    #[arg(long, value_name = "N", default_value_t = 200_000)]
    messages: usize,
    /// Bytes of plaintext per message.
    #[arg(long, value_name = "BYTES", default_value_t = 100)]
    size: usize,
    /// Runs of each; the table gives the median.
    #[arg(long, value_name = "N", default_value_t = 5)]
    runs: usize,
}

/// One server side, behind the same three calls.
trait Side {
    fn write(&mut self, plain: &[u8]);
    fn take_tls(&mut self, out: &mut Vec<u8>);
    fn feed(&mut self, tls: &[u8], plain: &mut Vec<u8>);
}

impl Side for Connection {
    fn write(&mut self, plain: &[u8]) {
        Connection::write(self, plain).expect("seal");
    }
    fn take_tls(&mut self, out: &mut Vec<u8>) {
        while self.wants_write() {
            self.write_tls(out).expect("take the records");
        }
    }
    fn feed(&mut self, mut tls: &[u8], plain: &mut Vec<u8>) {
        while !tls.is_empty() {
            self.read_tls(&mut tls).expect("feed");
            self.process(plain).expect("open");
        }
    }
}

impl Side for ServerConnection {
    fn write(&mut self, plain: &[u8]) {
        self.writer().write_all(plain).expect("seal");
    }
    fn take_tls(&mut self, out: &mut Vec<u8>) {
        while self.wants_write() {
            self.write_tls(out).expect("take the records");
        }
    }
    fn feed(&mut self, mut tls: &[u8], plain: &mut Vec<u8>) {
        while !tls.is_empty() {
            self.read_tls(&mut tls).expect("feed");
            self.process_new_packets().expect("open");
            let mut buf = [0; 16 * 1024];
            while let Ok(n) = self.reader().read(&mut buf) {
                if n == 0 {
                    break;
                }
                plain.extend_from_slice(&buf[..n]);
            }
        }
    }
}

/// Moves bytes between a client and a server side until both are quiet.
fn handshake(client: &mut ClientConnection, server: &mut dyn Side) {
    for _ in 0..10 {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).expect("client hello");
        }
        let mut plain = Vec::new();
        server.feed(&wire, &mut plain);
        let mut back = Vec::new();
        server.take_tls(&mut back);
        let mut rd = back.as_slice();
        while !rd.is_empty() {
            client.read_tls(&mut rd).expect("client reads");
            client.process_new_packets().expect("client processes");
        }
        if wire.is_empty() && back.is_empty() {
            return;
        }
    }
}

/// Seconds to seal, then to open, `n` messages of `msg` on `server`.
fn time_side(
    client: &mut ClientConnection,
    server: &mut dyn Side,
    msg: &[u8],
    n: usize,
) -> (f64, f64) {
    let mut wire = Vec::with_capacity(n * (msg.len() + 64));
    let t = Instant::now();
    for _ in 0..n {
        server.write(msg);
        server.take_tls(&mut wire);
    }
    let seal = t.elapsed().as_secs_f64();
    // The client's records, sealed beforehand (not timed).
    let mut records = Vec::with_capacity(n * (msg.len() + 64));
    for _ in 0..n {
        client.writer().write_all(msg).expect("client seals");
        while client.wants_write() {
            client.write_tls(&mut records).expect("client records");
        }
    }
    let mut plain = Vec::with_capacity(n * msg.len());
    let t = Instant::now();
    server.feed(&records, &mut plain);
    let open = t.elapsed().as_secs_f64();
    assert_eq!(plain.len(), n * msg.len(), "every message opened once");
    (seal, open)
}

pub fn tls_records(args: TlsArgs) -> Result<(), BoxError> {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    let der = CertificateDer::from(made.cert.der().to_vec());
    let key = PrivateKeyDer::try_from(made.key_pair.serialize_der())?;
    let config = Config::new(vec![der.clone()], key)?;
    let mut roots = RootCertStore::empty();
    roots.add(der)?;
    let client_config = Arc::new(
        ClientConfig::builder_with_provider(
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let msg = vec![b'x'; args.size];
    let mut results: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
    let mut suite = String::new();
    for _ in 0..args.runs {
        for (i, results) in results.iter_mut().enumerate() {
            let mut client =
                ClientConnection::new(client_config.clone(), ServerName::try_from("localhost")?)?;
            let mut server: Box<dyn Side> = if i == 0 {
                Box::new(ServerConnection::new(config.rustls().clone())?)
            } else {
                Box::new(Connection::accept(&config)?)
            };
            handshake(&mut client, server.as_mut());
            suite = format!("{:?}", client.negotiated_cipher_suite().map(|s| s.suite()));
            results.push(time_side(&mut client, server.as_mut(), &msg, args.messages));
        }
    }
    println!(
        "copyover-bench tls-records --messages {} --size {} --runs {}: {} messages of {} bytes each way, {suite}; median of {} runs",
        args.messages, args.size, args.runs, args.messages, args.size, args.runs
    );
    println!();
    println!("| server side | seal ns/msg | seal MB/s | open ns/msg | open MB/s |");
    println!("|---|---|---|---|---|");
    for (name, runs) in [
        ("rustls ServerConnection", &results[0]),
        ("copyover::tls::Connection", &results[1]),
    ] {
        let median = |f: fn(&(f64, f64)) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (seal, open) = (median(|r| r.0), median(|r| r.1));
        let n = args.messages as f64;
        let mb = n * args.size as f64 / 1e6;
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} |",
            seal * 1e9 / n,
            mb / seal,
            open * 1e9 / n,
            mb / open
        );
    }
    Ok(())
}
