//! The telnet side of a connection: option negotiation, line editing, echo.
//!
//! Its whole state is plain data, serialized into the snapshot, so an upgrade
//! in the middle of an IAC sequence or of a half-typed line loses nothing.

use serde::{Deserialize, Serialize};

pub const IAC: u8 = 255;
const DONT: u8 = 254;
const DO: u8 = 253;
const WONT: u8 = 252;
const WILL: u8 = 251;
const SB: u8 = 250;
const SE: u8 = 240;
const OPT_ECHO: u8 = 1;
const OPT_SGA: u8 = 3;

/// Longest line kept; further bytes of a line are dropped.
pub const MAX_LINE: usize = 4096;

/// What the server sends on connect: it offers to echo and to suppress
/// go-ahead, which puts real telnet clients in character mode.
pub const OFFER: [u8; 6] = [IAC, WILL, OPT_ECHO, IAC, WILL, OPT_SGA];

/// Where the parser stands between two bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Parse {
    #[default]
    Data,
    /// After a `\r`: a following `\n` or `\0` belongs to it.
    Cr,
    Iac,
    /// After IAC WILL/WONT/DO/DONT: the option byte comes next.
    Opt(u8),
    /// Inside a subnegotiation.
    Sub,
    SubIac,
}

/// A connection's telnet state: the parser, the line being typed, and
/// whether the client agreed that the server echoes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Telnet {
    pub parse: Parse,
    pub line: Vec<u8>,
    pub echo: bool,
}

impl Telnet {
    /// Feeds received bytes. Completed lines go to `lines`; echo and
    /// negotiation replies go to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>, lines: &mut Vec<String>) {
        for &b in data {
            self.byte(b, out, lines);
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<u8>, lines: &mut Vec<String>) {
        match self.parse {
            Parse::Cr => {
                self.parse = Parse::Data;
                if b != b'\n' && b != 0 {
                    self.byte(b, out, lines);
                }
            }
            Parse::Data => match b {
                IAC => self.parse = Parse::Iac,
                b'\r' | b'\n' => {
                    if b == b'\r' {
                        self.parse = Parse::Cr;
                    }
                    if self.echo {
                        out.extend_from_slice(b"\r\n");
                    }
                    let line = std::mem::take(&mut self.line);
                    lines.push(String::from_utf8_lossy(&line).into_owned());
                }
                0x7f | 0x08 => {
                    if let Some(last) = self.line.pop() {
                        // A multi-byte UTF-8 character goes as a whole.
                        if last & 0xc0 == 0x80 {
                            while let Some(c) = self.line.pop() {
                                if c & 0xc0 != 0x80 {
                                    break;
                                }
                            }
                        }
                        if self.echo {
                            out.extend_from_slice(b"\x08 \x08");
                        }
                    }
                }
                b'\t' => self.push(b' ', out),
                0..=0x1f => {}
                _ => self.push(b, out),
            },
            Parse::Iac => {
                self.parse = Parse::Data;
                match b {
                    IAC => self.push(IAC, out),
                    WILL | WONT | DO | DONT => self.parse = Parse::Opt(b),
                    SB => self.parse = Parse::Sub,
                    _ => {}
                }
            }
            Parse::Opt(cmd) => {
                self.parse = Parse::Data;
                self.option(cmd, b, out);
            }
            Parse::Sub => {
                if b == IAC {
                    self.parse = Parse::SubIac;
                }
            }
            Parse::SubIac => self.parse = if b == SE { Parse::Data } else { Parse::Sub },
        }
    }

    fn push(&mut self, b: u8, out: &mut Vec<u8>) {
        if self.line.len() < MAX_LINE {
            self.line.push(b);
            if self.echo {
                out.push(b);
                if b == IAC {
                    out.push(IAC);
                }
            }
        }
    }

    /// Answers a negotiation. We offered ECHO and SGA; everything else we
    /// neither do nor want. Replies only when something changes, so two
    /// peers never loop.
    fn option(&mut self, cmd: u8, opt: u8, out: &mut Vec<u8>) {
        match (cmd, opt) {
            (DO, OPT_ECHO) => self.echo = true,
            (DONT, OPT_ECHO) if self.echo => {
                self.echo = false;
                out.extend_from_slice(&[IAC, WONT, OPT_ECHO]);
            }
            (DO, OPT_SGA) | (DONT, OPT_SGA) | (WONT, _) | (DONT, _) => {}
            (DO, o) => out.extend_from_slice(&[IAC, WONT, o]),
            (WILL, o) => out.extend_from_slice(&[IAC, DONT, o]),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(t: &mut Telnet, input: &[u8]) -> (Vec<u8>, Vec<String>) {
        let (mut out, mut lines) = (Vec::new(), Vec::new());
        t.feed(input, &mut out, &mut lines);
        (out, lines)
    }

    #[test]
    fn all_three_line_endings_end_a_line() {
        let mut t = Telnet::default();
        let (_, lines) = run(&mut t, b"a\r\nb\nc\r\0d\r");
        assert_eq!(lines, ["a", "b", "c", "d"]);
        let (_, lines) = run(&mut t, b"\ne\n");
        assert_eq!(
            lines,
            ["e"],
            "the \\n after a \\r split across reads is not a new line"
        );
    }

    #[test]
    fn negotiation_never_shows_up_as_text() {
        let mut t = Telnet::default();
        let (out, lines) = run(
            &mut t,
            &[
                IAC, DO, OPT_ECHO, IAC, DO, OPT_SGA, IAC, WILL, 24, IAC, SB, 24, 0, b'x', IAC, SE,
                b'h', b'i', b'\r', 0,
            ],
        );
        assert_eq!(lines, ["hi"]);
        assert!(t.echo);
        assert_eq!(out, [IAC, DONT, 24, b'h', b'i', b'\r', b'\n']);
    }

    #[test]
    fn backspace_edits_the_line_and_echoes() {
        let mut t = Telnet {
            echo: true,
            ..Telnet::default()
        };
        let (out, lines) = run(&mut t, b"zedx\x7f\r\0");
        assert_eq!(lines, ["zed"]);
        assert_eq!(out, b"zedx\x08 \x08\r\n");
        let (_, lines) = run(&mut t, "h\u{e9}\x08\x08i\n".as_bytes());
        assert_eq!(lines, ["i"]);
        let (_, lines) = run(&mut t, "\u{e9}x\x08\n".as_bytes());
        assert_eq!(lines, ["\u{e9}"]);
    }

    #[test]
    fn a_sequence_split_across_reads_resumes() {
        let mut t = Telnet::default();
        run(&mut t, &[b'a', IAC]);
        let (_, lines) = run(&mut t, &[WILL, 31, b'b', b'\n']);
        assert_eq!(lines, ["ab"]);
    }
}
