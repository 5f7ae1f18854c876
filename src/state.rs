//! The application's state: what it is called, which version it is, and how
//! older versions are read.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::snapshot::{SnapshotError, decode_state};

/// The state an application hands over at an upgrade.
///
/// The snapshot records the state's version. A new binary reads a snapshot
/// of its own version directly and an older one through [`migrate`], which
/// the application writes. A binary that can read neither says so when the
/// old image probes it, and the upgrade is refused before anything happens.
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct ChatV1 { users: Vec<String> }
///
/// #[derive(Serialize, Deserialize)]
/// struct Chat { users: Vec<String>, motd: String }
///
/// impl copyover::AppState for Chat {
///     const VERSION: u32 = 2;
///     fn migrate(from: u32, payload: &[u8]) -> Option<Result<Self, copyover::SnapshotError>> {
///         match from {
///             1 => Some(copyover::snapshot::decode_state::<ChatV1>(payload, 1)
///                 .map(|old| Chat { users: old.users, motd: String::new() })),
///             _ => None,
///         }
///     }
/// }
/// ```
///
/// [`migrate`]: AppState::migrate
pub trait AppState: Serialize + DeserializeOwned {
    /// The version of this state's layout. Bump it whenever the serialized
    /// form changes, and teach [`migrate`](AppState::migrate) the old one.
    const VERSION: u32;

    /// Reads a payload written by state version `from` (not
    /// [`VERSION`](AppState::VERSION)). Returns `None` if this binary has no
    /// migration from that version (the default).
    fn migrate(from: u32, payload: &[u8]) -> Option<Result<Self, SnapshotError>> {
        let _ = (from, payload);
        None
    }

    /// Checks the state once it is decoded (and migrated), before anything
    /// uses it: an `Err` with a reason refuses it like a decoding error (the
    /// probe refuses the upgrade; after the exec, it rolls back). Accepts
    /// every state by default.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Decodes a payload of state version `version` as `S`, migrating if needed.
pub(crate) fn restore<S: AppState>(
    app: &str,
    version: u32,
    payload: &[u8],
) -> Result<S, SnapshotError> {
    let state = if version == S::VERSION {
        decode_state(payload, version)
    } else {
        S::migrate(version, payload).unwrap_or_else(|| {
            Err(SnapshotError::StateVersion {
                app: app.to_owned(),
                found: version,
                supported: S::VERSION,
            })
        })
    }?;
    state
        .check()
        .map_err(|reason| SnapshotError::Refused { version, reason })?;
    Ok(state)
}

/// Decodes a map field in bulk: every entry is read into a vector first,
/// then the map is built from it in one go. For a `BTreeMap`, whose
/// entries a snapshot holds in key order, that is one pass that builds the
/// tree bottom up, instead of one search from the root per entry, which is
/// what serde's own `Deserialize` does (and which makes decoding a map of
/// 9,000 users string compares, mostly). The encoding is unchanged: a map
/// written by any build reads back the same, and duplicate keys keep the
/// last value, as serde's would.
///
/// Use it on the large maps of your state, the new image's restore waits
/// for them:
///
/// ```
/// use std::collections::BTreeMap;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Chat {
///     #[serde(deserialize_with = "copyover::state::bulk_map")]
///     users: BTreeMap<String, u64>,
/// }
///
/// let mut users = BTreeMap::new();
/// users.insert("ann".to_string(), 1);
/// let bytes = copyover::snapshot::encode_state(&Chat { users }).unwrap();
/// let chat: Chat = copyover::snapshot::decode_state(&bytes, 1).unwrap();
/// assert_eq!(chat.users["ann"], 1);
/// ```
///
/// # Errors
///
/// Those of the deserializer, as for the map's own `Deserialize`.
pub fn bulk_map<'de, D, M, K, V>(deserializer: D) -> Result<M, D::Error>
where
    D: Deserializer<'de>,
    M: FromIterator<(K, V)>,
    K: Deserialize<'de>,
    V: Deserialize<'de>,
{
    struct Entries<M, K, V>(PhantomData<(M, K, V)>);

    impl<'de, M, K, V> Visitor<'de> for Entries<M, K, V>
    where
        M: FromIterator<(K, V)>,
        K: Deserialize<'de>,
        V: Deserialize<'de>,
    {
        type Value = M;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<M, A::Error> {
            // The length comes from the input: trusted for a megabyte of
            // entries at most (as serde's own collections do).
            let most = (1 << 20) / std::mem::size_of::<(K, V)>().max(1);
            let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(most));
            while let Some(entry) = map.next_entry()? {
                entries.push(entry);
            }
            Ok(entries.into_iter().collect())
        }
    }

    deserializer.deserialize_map(Entries(PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::encode_state;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct V1 {
        n: u32,
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct V2 {
        n: u32,
        label: String,
    }
    impl AppState for V2 {
        const VERSION: u32 = 2;
        fn migrate(from: u32, payload: &[u8]) -> Option<Result<Self, SnapshotError>> {
            (from == 1).then(|| {
                decode_state::<V1>(payload, 1).map(|v| V2 {
                    n: v.n,
                    label: "new".into(),
                })
            })
        }
    }

    #[test]
    fn a_map_decoded_in_bulk_is_the_map_serde_decodes() {
        use std::collections::{BTreeMap, HashMap};
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct Plain {
            m: BTreeMap<String, u32>,
            h: HashMap<u64, String>,
        }
        #[derive(Deserialize, Debug, PartialEq)]
        struct Bulk {
            #[serde(deserialize_with = "bulk_map")]
            m: BTreeMap<String, u32>,
            #[serde(deserialize_with = "bulk_map")]
            h: HashMap<u64, String>,
        }
        let plain = Plain {
            m: (0..500).map(|i| (format!("user{i}"), i)).collect(),
            h: (0..50).map(|i| (i, i.to_string())).collect(),
        };
        let bytes = encode_state(&plain).unwrap();
        let bulk: Bulk = decode_state(&bytes, 1).unwrap();
        assert_eq!((bulk.m, bulk.h), (plain.m, plain.h));

        // Keys out of order and repeated (a sequence of pairs is encoded
        // as a map is): the last value wins, as with serde.
        let bytes = encode_state(&vec![(2u8, 1u8), (1, 1), (2, 9)]).unwrap();
        #[derive(Deserialize)]
        struct One(#[serde(deserialize_with = "bulk_map")] BTreeMap<u8, u8>);
        let plain: BTreeMap<u8, u8> = decode_state(&bytes, 1).unwrap();
        let bulk: One = decode_state(&bytes, 1).unwrap();
        assert_eq!(bulk.0, plain);
        assert_eq!(plain[&2], 9);
    }

    #[test]
    fn migrates_v1_and_refuses_unknown_versions() {
        let v1 = encode_state(&V1 { n: 7 }).unwrap();
        assert_eq!(
            restore::<V2>("t", 1, &v1).unwrap(),
            V2 {
                n: 7,
                label: "new".into()
            }
        );
        let err = restore::<V2>("t", 3, &v1).unwrap_err().to_string();
        assert_eq!(
            err,
            "snapshot was written by app 't' state v3; this binary reads v2 and has no migration from v3"
        );
    }

    #[test]
    fn a_state_that_refuses_itself_is_refused_with_its_reason() {
        #[derive(Debug, Serialize, Deserialize)]
        struct Picky(u32);
        impl AppState for Picky {
            const VERSION: u32 = 1;
            fn check(&self) -> Result<(), String> {
                (self.0 < 10)
                    .then_some(())
                    .ok_or(format!("{} is too many", self.0))
            }
        }
        assert!(restore::<Picky>("t", 1, &encode_state(&Picky(3)).unwrap()).is_ok());
        let err = restore::<Picky>("t", 1, &encode_state(&Picky(12)).unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the state (v1) decoded but is refused: 12 is too many"
        );
    }
}
