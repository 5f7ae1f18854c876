//! The chat itself: users, their variables, connections and commands.
//! Pure state and logic, no I/O: everything here is the snapshot.

use std::collections::{BTreeMap, BTreeSet};

use copyover::snapshot::decode_state;
use copyover::state::bulk_map;
use copyover::{AppState, SnapshotError};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::telnet::{OFFER, Telnet};

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

pub const fn env_is(value: Option<&str>, want: &str) -> bool {
    match value {
        Some(v) => same(v, want),
        None => false,
    }
}

/// The fault a bad release build carries (`COPYOVER_DEMO_FAULT`), if any.
pub const FAULT: Option<&str> = match option_env!("COPYOVER_DEMO_FAULT") {
    Some(f) if !f.is_empty() => Some(f),
    _ => None,
};

/// The faults `COPYOVER_DEMO_FAULT` may name.
const FAULTS: [&str; 19] = [
    "reject-state",
    "wrong-app",
    "panic-after-adopt",
    "abort-after-adopt",
    "hang-after-adopt",
    "exit-before-ready",
    "error-after-adopt",
    "thread-before-boot",
    "hang-before-main",
    "ignore-a-failed-take",
    "panic-with-a-long-message",
    "pending-alarm-then-panic",
    "zombie-then-panic",
    "write-tls-then-panic",
    "slow-ready",
    "thread-on-rollback",
    "abort-on-two-threads",
    "slow-batch",
    "slow-take",
];

const fn known_fault(fault: Option<&str>) -> bool {
    let Some(f) = fault else { return true };
    let mut i = 0;
    while i < FAULTS.len() {
        if same(f, FAULTS[i]) {
            return true;
        }
        i += 1;
    }
    false
}

// A misspelt fault fails the build instead of making a silent good build.
const _: () = assert!(
    known_fault(FAULT),
    "COPYOVER_DEMO_FAULT must be one of: reject-state, wrong-app, panic-after-adopt, abort-after-adopt, hang-after-adopt, exit-before-ready, error-after-adopt, thread-before-boot, hang-before-main, ignore-a-failed-take, panic-with-a-long-message, pending-alarm-then-panic, zombie-then-panic, write-tls-then-panic, slow-ready, thread-on-rollback, abort-on-two-threads, slow-batch, slow-take"
);

/// The state version this build writes: 2, or 1 for a build made with
/// `COPYOVER_DEMO_STATE=1` (to test the v1 to v2 migration), or one no
/// snapshot has for the `reject-state` fault build.
pub const STATE_VERSION: u32 = if env_is(FAULT, "reject-state") {
    1000
} else if env_is(option_env!("COPYOVER_DEMO_STATE"), "1") {
    1
} else {
    2
};

/// A user's variables, in key order.
///
/// A user sets a few: a sorted vector is one allocation, where a
/// `BTreeMap` takes a node of about 500 bytes, and 9,000 users' nodes are
/// megabytes the new image must allocate and fault in while every client
/// waits. Encoded as a map, exactly as the `BTreeMap` of earlier builds was.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vars(Vec<(String, String)>);

impl Vars {
    fn find(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }

    pub fn get(&self, key: &str) -> Option<&String> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    pub fn insert(&mut self, key: String, value: String) {
        match self.find(&key) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (key, value)),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl std::ops::Index<&str> for Vars {
    type Output = String;

    fn index(&self, key: &str) -> &String {
        self.get(key)
            .unwrap_or_else(|| panic!("no variable {key:?}"))
    }
}

/// Sorted by key; of two equal keys the later value stays, as in a map.
impl FromIterator<(String, String)> for Vars {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let mut all: Vec<(String, String)> = iter.into_iter().collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let mut vars: Vec<(String, String)> = Vec::with_capacity(all.len());
        for (k, v) in all {
            match vars.last_mut() {
                Some(last) if last.0 == k => last.1 = v,
                _ => vars.push((k, v)),
            }
        }
        Vars(vars)
    }
}

impl Serialize for Vars {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Vars {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        bulk_map(d)
    }
}

/// A user, by name: outlives their connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    pub vars: Vars,
    /// New in state v2: how many times the user logged in.
    pub logins: u64,
}

#[derive(Deserialize)]
struct UserV2 {
    vars: Vars,
    logins: u64,
}

/// `UserV2` as written: borrowed, so that encoding copies nothing (serde
/// encodes a reference as the value).
#[derive(Serialize)]
struct UserV2Ref<'a> {
    vars: &'a Vars,
    logins: u64,
}

// State v1 stored only the variables; a v1 build writes and reads that.
impl Serialize for User {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if STATE_VERSION == 1 {
            self.vars.serialize(s)
        } else {
            UserV2Ref {
                vars: &self.vars,
                logins: self.logins,
            }
            .serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for User {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if STATE_VERSION == 1 {
            Ok(User {
                vars: Vars::deserialize(d)?,
                logins: 0,
            })
        } else {
            let u = UserV2::deserialize(d)?;
            Ok(User {
                vars: u.vars,
                logins: u.logins,
            })
        }
    }
}

/// One connection's state: everything but the socket.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Conn {
    pub name: Option<String>,
    /// Order of login, for `/who`.
    pub login: u64,
    pub telnet: Telnet,
    /// Output not yet written to the socket.
    pub out: Vec<u8>,
    /// `/quit` was typed: close once `out` is written.
    pub closing: bool,
}

/// The whole chat.
///
/// Its two large maps are decoded in bulk (`copyover::state::bulk_map`):
/// the new image builds each tree in one pass while every client waits.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Chat {
    pub next_id: u64,
    pub next_login: u64,
    #[serde(deserialize_with = "bulk_map")]
    pub users: BTreeMap<String, User>,
    #[serde(deserialize_with = "bulk_map")]
    pub conns: BTreeMap<u64, Conn>,
    /// During a gradual migration: who is online in the other process, by
    /// login. Not in the snapshot (the other process says it again).
    #[serde(skip)]
    pub remote: Vec<(u64, String)>,
    /// During a gradual migration: lines said here, for the other process.
    #[serde(skip)]
    pub relay: Option<Vec<String>>,
}

/// One user moving to the other process of a gradual migration: the
/// connection's state and the user's own variables.
#[derive(Debug, Serialize, Deserialize)]
pub struct Moving {
    pub conn: Conn,
    pub user: Option<(String, User)>,
}

/// State v1, as a v2 build reads it.
#[derive(Deserialize)]
struct ChatV1 {
    next_id: u64,
    next_login: u64,
    #[serde(deserialize_with = "bulk_map")]
    users: BTreeMap<String, Vars>,
    #[serde(deserialize_with = "bulk_map")]
    conns: BTreeMap<u64, Conn>,
}

impl AppState for Chat {
    const VERSION: u32 = STATE_VERSION;

    fn migrate(from: u32, payload: &[u8]) -> Option<Result<Self, SnapshotError>> {
        if from != 1 || STATE_VERSION == 1000 {
            return None;
        }
        Some(decode_state::<ChatV1>(payload, 1).map(|v1| {
            Chat {
                next_id: v1.next_id,
                next_login: v1.next_login,
                users: v1
                    .users
                    .into_iter()
                    .map(|(name, vars)| (name, User { vars, logins: 0 }))
                    .collect(),
                conns: v1.conns,
                ..Chat::default()
            }
        }))
    }
}

/// Longest name accepted.
const MAX_NAME: usize = 32;

impl Chat {
    /// A new connection: offers telnet options and asks for a name.
    pub fn connect(&mut self, label: &str) -> u64 {
        let id = self.next_id;
        let greeting = format!(
            "Welcome to copyover-telnetd {label}, a chat that upgrades without hanging up.\r\n"
        );
        self.connect_as(id, &greeting);
        id
    }

    /// A connection with a given id (one that systemd kept across a crash
    /// but that the last checkpoint did not know): greets it and asks for a
    /// name. Later connections get higher ids.
    pub fn connect_as(&mut self, id: u64, greeting: &str) {
        self.next_id = self.next_id.max(id + 1);
        let mut out = OFFER.to_vec();
        out.extend_from_slice(format!("{greeting}What is your name?\r\n").as_bytes());
        self.conns.insert(
            id,
            Conn {
                out,
                ..Conn::default()
            },
        );
    }

    /// Bytes received on connection `id`. Every connection that got output
    /// is added to `dirty`.
    pub fn input(&mut self, id: u64, data: &[u8], version: &str, dirty: &mut BTreeSet<u64>) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let mut lines = Vec::new();
        conn.telnet.feed(data, &mut conn.out, &mut lines);
        dirty.insert(id);
        for line in lines {
            if self.conns.get(&id).is_none_or(|c| c.closing) {
                break;
            }
            self.line(id, &line, version, dirty);
        }
    }

    fn reply(&mut self, id: u64, text: &str) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.out.extend_from_slice(text.as_bytes());
            c.out.extend_from_slice(b"\r\n");
        }
    }

    fn line(&mut self, id: u64, line: &str, version: &str, dirty: &mut BTreeSet<u64>) {
        let Some(name) = self.conns.get(&id).and_then(|c| c.name.clone()) else {
            return self.login(id, line.trim());
        };
        if line.starts_with('/') {
            return self.command(id, &name, line, version);
        }
        if line.trim().is_empty() {
            return;
        }
        let msg = format!("{name}: {line}\r\n");
        self.deliver(&msg, Some(id), dirty);
        if let Some(relay) = self.relay.as_mut() {
            relay.push(msg);
        }
    }

    /// A chat line for every named user here but `except`.
    pub fn deliver(&mut self, msg: &str, except: Option<u64>, dirty: &mut BTreeSet<u64>) {
        for (other, c) in self.conns.iter_mut() {
            if Some(*other) != except && c.name.is_some() && !c.closing {
                c.out.extend_from_slice(msg.as_bytes());
                dirty.insert(*other);
            }
        }
    }

    /// Who is online here, by login.
    pub fn online(&self) -> Vec<(u64, String)> {
        let mut online: Vec<(u64, String)> = self
            .conns
            .values()
            .filter_map(|c| c.name.clone().map(|n| (c.login, n)))
            .collect();
        online.sort();
        online
    }

    /// A user about to move away: its record (the connection's state and
    /// the user's variables).
    pub fn moving(&self, id: u64) -> Option<Moving> {
        let conn = self.conns.get(&id)?.clone();
        let user = conn
            .name
            .as_ref()
            .and_then(|n| self.users.get(n).map(|u| (n.clone(), u.clone())));
        Some(Moving { conn, user })
    }

    /// A user that moved here: a connection id of this process, and its
    /// variables (the other process had the newer ones).
    pub fn arrive(&mut self, moving: Moving) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        if let Some((name, user)) = moving.user {
            self.users.insert(name, user);
        }
        self.conns.insert(id, moving.conn);
        id
    }

    fn login(&mut self, id: u64, name: &str) {
        if name.is_empty() {
            return self.reply(id, "A name, please:");
        }
        if name.chars().count() > MAX_NAME || name.chars().any(|c| c.is_control() || c == ',') {
            return self.reply(
                id,
                &format!("Names have at most {MAX_NAME} characters and no commas; another one:"),
            );
        }
        if self.conns.values().any(|c| c.name.as_deref() == Some(name))
            || self.remote.iter().any(|(_, n)| n == name)
        {
            return self.reply(id, &format!("{name} is already online; another name:"));
        }
        let login = self.next_login;
        self.next_login += 1;
        self.users.entry(name.to_owned()).or_default().logins += 1;
        if let Some(c) = self.conns.get_mut(&id) {
            c.name = Some(name.to_owned());
            c.login = login;
        }
        self.reply(id, &format!("welcome, {name}"));
    }

    fn command(&mut self, id: u64, name: &str, line: &str, version: &str) {
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim_start();
        match cmd {
            "/who" => {
                // Both processes' users during a gradual migration.
                let mut online = self.online();
                online.extend(self.remote.iter().cloned());
                online.sort();
                let names: Vec<&str> = online.iter().map(|(_, n)| n.as_str()).collect();
                self.reply(id, &format!("online: {}", names.join(", ")));
            }
            "/version" => self.reply(id, version),
            "/set" => match rest.split_once(' ') {
                Some((key, value)) if !key.is_empty() => {
                    let user = self.users.entry(name.to_owned()).or_default();
                    user.vars.insert(key.to_owned(), value.to_owned());
                    self.reply(id, "ok");
                }
                _ => self.reply(id, "usage: /set KEY VALUE"),
            },
            "/get" => {
                let key = rest.trim();
                if key.is_empty() {
                    return self.reply(id, "usage: /get KEY");
                }
                let text = match self.users.get(name).and_then(|u| u.vars.get(key)) {
                    Some(v) => format!("{key} = {v}"),
                    None => format!("{key} is not set"),
                };
                self.reply(id, &text);
            }
            "/vars" => {
                let lines: Vec<String> = self
                    .users
                    .get(name)
                    .map(|u| u.vars.iter().map(|(k, v)| format!("{k} = {v}")).collect())
                    .unwrap_or_default();
                for l in lines {
                    self.reply(id, &l);
                }
                self.reply(id, "end");
            }
            "/quit" => {
                self.reply(id, "bye");
                if let Some(c) = self.conns.get_mut(&id) {
                    c.closing = true;
                }
            }
            other => self.reply(id, &format!("unknown command: {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(chat: &mut Chat, id: u64) -> String {
        let out = std::mem::take(&mut chat.conns.get_mut(&id).unwrap().out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn send(chat: &mut Chat, id: u64, line: &str) -> String {
        let mut dirty = BTreeSet::new();
        chat.input(
            id,
            format!("{line}\r\n").as_bytes(),
            "copyover-telnetd t pid=1 generation=0",
            &mut dirty,
        );
        text(chat, id)
    }

    #[test]
    fn a_session_as_the_spec_describes_it() {
        let mut chat = Chat::default();
        let a = chat.connect("t");
        assert!(text(&mut chat, a).contains("copyover-telnetd"));
        assert_eq!(send(&mut chat, a, "  "), "A name, please:\r\n");
        assert_eq!(send(&mut chat, a, " ann "), "welcome, ann\r\n");
        let b = chat.connect("t");
        text(&mut chat, b);
        assert!(send(&mut chat, b, "ann").contains("already online"));
        assert_eq!(send(&mut chat, b, "bob"), "welcome, bob\r\n");
        assert_eq!(send(&mut chat, b, "/who"), "online: ann, bob\r\n");
        assert_eq!(send(&mut chat, b, "/set color deep blue"), "ok\r\n");
        assert_eq!(send(&mut chat, b, "/set a 1"), "ok\r\n");
        assert_eq!(send(&mut chat, b, "/get color"), "color = deep blue\r\n");
        assert_eq!(send(&mut chat, b, "/get size"), "size is not set\r\n");
        assert_eq!(
            send(&mut chat, b, "/vars"),
            "a = 1\r\ncolor = deep blue\r\nend\r\n"
        );
        assert_eq!(send(&mut chat, b, "/set x"), "usage: /set KEY VALUE\r\n");
        assert_eq!(send(&mut chat, b, "/dance"), "unknown command: /dance\r\n");
        assert_eq!(
            send(&mut chat, b, "/version"),
            "copyover-telnetd t pid=1 generation=0\r\n"
        );
        assert_eq!(send(&mut chat, b, "hello all"), "");
        assert_eq!(text(&mut chat, a), "bob: hello all\r\n");
        assert_eq!(send(&mut chat, b, "/quit"), "bye\r\n");
        assert!(chat.conns[&b].closing);
    }

    #[test]
    fn variables_outlive_the_connection() {
        let mut chat = Chat::default();
        let a = chat.connect("t");
        send(&mut chat, a, "ann");
        send(&mut chat, a, "/set k v");
        chat.conns.remove(&a);
        let b = chat.connect("t");
        send(&mut chat, b, "ann");
        assert_eq!(send(&mut chat, b, "/get k"), "k = v\r\n");
        assert_eq!(chat.users["ann"].logins, 2);
    }

    #[test]
    fn vars_are_encoded_as_the_map_of_earlier_builds() {
        let map = BTreeMap::from([
            ("b".to_string(), "2".to_string()),
            ("a".to_string(), "1".to_string()),
        ]);
        let mut vars = Vars::default();
        vars.insert("b".into(), "0".into());
        vars.insert("a".into(), "1".into());
        vars.insert("b".into(), "2".into());
        let bytes = copyover::snapshot::encode_state(&map).unwrap();
        assert_eq!(copyover::snapshot::encode_state(&vars).unwrap(), bytes);
        let back: Vars = copyover::snapshot::decode_state(&bytes, 2).unwrap();
        assert_eq!(back, vars);
        let keys: Vec<&str> = back.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a", "b"]);
    }

    #[test]
    fn state_v1_migrates_to_v2() {
        #[derive(Serialize)]
        struct V1 {
            next_id: u64,
            next_login: u64,
            users: BTreeMap<String, BTreeMap<String, String>>,
            conns: BTreeMap<u64, Conn>,
        }
        let mut users = BTreeMap::new();
        users.insert(
            "ann".to_string(),
            BTreeMap::from([("k".to_string(), "v".to_string())]),
        );
        let payload = copyover::snapshot::encode_state(&V1 {
            next_id: 3,
            next_login: 1,
            users,
            conns: BTreeMap::new(),
        })
        .unwrap();
        let chat = Chat::migrate(1, &payload).unwrap().unwrap();
        assert_eq!(chat.users["ann"].vars["k"], "v");
        assert_eq!(chat.next_id, 3);
    }
}
