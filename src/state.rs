//! The application's state: what it is called, which version it is, and how
//! older versions are read.

use serde::Serialize;
use serde::de::DeserializeOwned;

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
}

/// Decodes a payload of state version `version` as `S`, migrating if needed.
pub(crate) fn restore<S: AppState>(
    app: &str,
    version: u32,
    payload: &[u8],
) -> Result<S, SnapshotError> {
    if version == S::VERSION {
        return decode_state(payload, version);
    }
    S::migrate(version, payload).unwrap_or_else(|| {
        Err(SnapshotError::StateVersion {
            app: app.to_owned(),
            found: version,
            supported: S::VERSION,
        })
    })
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
}
