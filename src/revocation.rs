//! Revoked tokens (by `jti`) and users (by tenant and user), each until a moment: a handshake
//! whose token or user is revoked is refused with 401 `token_revoked`.
//!
//! Handshakes read the set without a lock (one pointer load; nothing more while it is empty).
//! Changes are rare — an operator's call — and replace the set whole: the expired entries are
//! dropped then, so the set holds only what still refuses someone. With a state directory the
//! set is written there atomically (a temporary file, synced, renamed over the old one, the
//! directory synced) before a change takes effect, and read back at start.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::connections::Selector;

/// The most revocations held at once: a bound on memory and on the state file, far above what
/// operators revoke within tokens' lifetimes.
const MAX_ENTRIES: usize = 100_000;
const STATE_FILE: &str = "revocations.json";

/// What a revocation names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Revoked {
    Jti(String),
    /// A user of a tenant (the empty tenant for users without one).
    User {
        tenant: String,
        user: String,
    },
}

impl Revoked {
    /// The connections this revocation ends.
    pub(crate) fn selector(&self) -> Selector {
        match self {
            Revoked::Jti(jti) => Selector {
                jti: Some(jti.clone()),
                ..Selector::default()
            },
            Revoked::User { tenant, user } => Selector {
                user: Some(user.clone()),
                tenant: (!tenant.is_empty()).then(|| tenant.clone()),
                without_tenant: tenant.is_empty(),
                ..Selector::default()
            },
        }
    }
}

/// A change made while the cluster reads the set back from Redis: made again over what it
/// read, which may predate it.
enum Change {
    Hold(Revoked, u64),
    Lift(Revoked),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RevocationError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not a revocation list: {error}")]
    Parse {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{MAX_ENTRIES} revocations are held already")]
    Full,
}

/// The set, as held and as written.
#[derive(Default, Clone, Serialize, Deserialize)]
struct Set {
    /// `jti` → until (Unix seconds).
    jtis: HashMap<String, u64>,
    /// Users, by tenant then user → until.
    users: HashMap<String, HashMap<String, u64>>,
}

impl Set {
    fn is_empty(&self) -> bool {
        self.jtis.is_empty() && self.users.is_empty()
    }

    fn len(&self) -> usize {
        self.jtis.len() + self.users.values().map(HashMap::len).sum::<usize>()
    }

    #[cfg(test)]
    fn until(&self, revoked: &Revoked) -> Option<u64> {
        match revoked {
            Revoked::Jti(jti) => self.jtis.get(jti).copied(),
            Revoked::User { tenant, user } => self.users.get(tenant)?.get(user).copied(),
        }
    }

    /// Holds `revoked` until `until`; a later `until` for the same entry wins.
    fn hold(&mut self, revoked: Revoked, until: u64) -> Result<(), RevocationError> {
        let slot = match revoked {
            Revoked::Jti(jti) => self.jtis.entry(jti).or_insert(0),
            Revoked::User { tenant, user } => self
                .users
                .entry(tenant)
                .or_default()
                .entry(user)
                .or_insert(0),
        };
        *slot = (*slot).max(until);
        if self.len() > MAX_ENTRIES {
            return Err(RevocationError::Full);
        }
        Ok(())
    }

    /// Lifts `revoked`: until when it held, if it did.
    fn lift(&mut self, revoked: &Revoked) -> Option<u64> {
        let lifted = match revoked {
            Revoked::Jti(jti) => self.jtis.remove(jti),
            Revoked::User { tenant, user } => self
                .users
                .get_mut(tenant)
                .and_then(|users| users.remove(user)),
        };
        self.users.retain(|_, users| !users.is_empty());
        lifted
    }

    fn contains(&self, revoked: &Revoked) -> bool {
        match revoked {
            Revoked::Jti(jti) => self.jtis.contains_key(jti),
            Revoked::User { tenant, user } => self
                .users
                .get(tenant)
                .is_some_and(|users| users.contains_key(user)),
        }
    }

    fn entries(&self) -> Vec<(Revoked, u64)> {
        let jtis = self
            .jtis
            .iter()
            .map(|(jti, until)| (Revoked::Jti(jti.clone()), *until));
        let users = self.users.iter().flat_map(|(tenant, users)| {
            users.iter().map(|(user, until)| {
                let revoked = Revoked::User {
                    tenant: tenant.clone(),
                    user: user.clone(),
                };
                (revoked, *until)
            })
        });
        jtis.chain(users).collect()
    }

    fn drop_expired(&mut self, now: u64) {
        self.jtis.retain(|_, until| *until > now);
        for users in self.users.values_mut() {
            users.retain(|_, until| *until > now);
        }
        self.users.retain(|_, users| !users.is_empty());
    }
}

pub(crate) struct Revocations {
    current: ArcSwap<Set>,
    /// Where the set is kept across restarts.
    file: Option<PathBuf>,
    /// Changes one at a time (a change is read, modify, write, swap); while the cluster reads
    /// the set back, the changes made meanwhile.
    changing: Mutex<Option<Vec<Change>>>,
}

/// Now, in Unix seconds.
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

impl Revocations {
    /// The set kept in `state_dir` (empty when there is none yet), or an empty one in memory.
    /// The directory is made if missing, and must be writable: a revocation that cannot be
    /// kept is found at start, not when an operator needs it.
    pub(crate) fn load(state_dir: Option<&Path>) -> Result<Self, RevocationError> {
        if let Some(dir) = state_dir {
            let probe = dir.join(format!(".{STATE_FILE}.probe"));
            std::fs::create_dir_all(dir)
                .and_then(|()| std::fs::write(&probe, b""))
                .and_then(|()| std::fs::remove_file(&probe))
                .map_err(|error| RevocationError::Write {
                    path: dir.to_path_buf(),
                    error,
                })?;
        }
        let file = state_dir.map(|dir| dir.join(STATE_FILE));
        let mut set = match &file {
            None => Set::default(),
            Some(path) => match std::fs::read(path) {
                Ok(bytes) => {
                    serde_json::from_slice(&bytes).map_err(|error| RevocationError::Parse {
                        path: path.clone(),
                        error,
                    })?
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Set::default(),
                Err(error) => {
                    return Err(RevocationError::Read {
                        path: path.clone(),
                        error,
                    });
                }
            },
        };
        set.drop_expired(now());
        Ok(Self {
            current: ArcSwap::from_pointee(set),
            file,
            changing: Mutex::new(None),
        })
    }

    /// Whether nothing is revoked (one pointer load).
    pub(crate) fn is_empty(&self) -> bool {
        self.current.load().is_empty()
    }

    /// Whether a token with `jti`, or its user, is revoked now.
    pub(crate) fn is_revoked(&self, jti: Option<&str>, tenant: Option<&str>, user: &str) -> bool {
        let set = self.current.load();
        if set.is_empty() {
            return false;
        }
        let now = now();
        let jti_revoked = jti
            .and_then(|jti| set.jtis.get(jti))
            .is_some_and(|until| *until > now);
        jti_revoked
            || set
                .users
                .get(tenant.unwrap_or(""))
                .and_then(|users| users.get(user))
                .is_some_and(|until| *until > now)
    }

    /// Revokes until `until` (Unix seconds); a later `until` for the same entry wins.
    pub(crate) fn revoke(&self, revoked: Revoked, until: u64) -> Result<(), RevocationError> {
        self.change(|set, journal| {
            if let Some(journal) = journal {
                journal.push(Change::Hold(revoked.clone(), until));
            }
            set.hold(revoked, until)
        })
    }

    /// Lifts a revocation: until when it held, if there was one.
    pub(crate) fn lift(&self, revoked: &Revoked) -> Result<Option<u64>, RevocationError> {
        let mut lifted = None;
        self.change(|set, journal| {
            if let Some(journal) = journal {
                journal.push(Change::Lift(revoked.clone()));
            }
            lifted = set.lift(revoked);
            Ok(())
        })?;
        Ok(lifted)
    }

    /// What is revoked now, and until when.
    pub(crate) fn entries(&self) -> Vec<(Revoked, u64)> {
        let now = now();
        let mut entries = self.current.load().entries();
        entries.retain(|(_, until)| *until > now);
        entries
    }

    /// Notes the changes made from now on, until the set is replaced with what the cluster
    /// reads from Redis next (which may predate them), or the guard is dropped.
    pub(crate) fn begin_replace(&self) -> Replacing<'_> {
        *self.changing.lock().unwrap_or_else(|p| p.into_inner()) = Some(Vec::new());
        Replacing { revocations: self }
    }

    /// Until when `revoked` holds, if it does.
    #[cfg(test)]
    pub(crate) fn until(&self, revoked: &Revoked) -> Option<u64> {
        self.current
            .load()
            .until(revoked)
            .filter(|until| *until > now())
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.current.load().len()
    }

    /// A change to a copy of the set, written (when kept) and then put in effect. A change
    /// that cannot be written takes effect all the same (an operator's revocation must not
    /// wait on a disk), until a restart: the error says so.
    fn change(
        &self,
        apply: impl FnOnce(&mut Set, &mut Option<Vec<Change>>) -> Result<(), RevocationError>,
    ) -> Result<(), RevocationError> {
        let mut journal = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        let mut set = Set::clone(&self.current.load());
        set.drop_expired(now());
        apply(&mut set, &mut journal)?;
        let written = match &self.file {
            Some(path) => serde_json::to_vec(&set)
                .map_err(std::io::Error::other)
                .and_then(|json| write_atomically(path, &json))
                .map_err(|error| RevocationError::Write {
                    path: path.clone(),
                    error,
                }),
            None => Ok(()),
        };
        self.current.store(Arc::new(set));
        written
    }
}

/// A read-back of the cluster's revocations in progress (see [`Revocations::begin_replace`]).
pub(crate) struct Replacing<'a> {
    revocations: &'a Revocations,
}

impl Replacing<'_> {
    /// Makes the set `entries`, a later `until` for the same entry winning, with the changes
    /// made since the read-back began made again over them. Answers what holds now that did
    /// not before, and whether all of it was kept: past `MAX_ENTRIES` the rest is not held,
    /// and a set that cannot be written is in effect all the same.
    pub(crate) fn replace(
        self,
        entries: Vec<(Revoked, u64)>,
    ) -> (Vec<Revoked>, Result<(), RevocationError>) {
        let mut added = Vec::new();
        let mut full = false;
        let result = self.revocations.change(|set, journal| {
            let before = std::mem::take(set);
            for (revoked, until) in entries {
                if set.hold(revoked, until).is_err() {
                    full = true;
                    break;
                }
            }
            for change in journal.take().unwrap_or_default() {
                match change {
                    Change::Hold(revoked, until) => full |= set.hold(revoked, until).is_err(),
                    Change::Lift(revoked) => {
                        set.lift(&revoked);
                    }
                }
            }
            set.drop_expired(now());
            added = set
                .entries()
                .into_iter()
                .map(|(revoked, _)| revoked)
                .filter(|revoked| !before.contains(revoked))
                .collect();
            Ok(())
        });
        let result = match result {
            Ok(()) if full => Err(RevocationError::Full),
            other => other,
        };
        (added, result)
    }
}

impl Drop for Replacing<'_> {
    fn drop(&mut self) {
        *self
            .revocations
            .changing
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one whole.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temporary = dir.join(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, path)?;
    // The new file is in place; a failed sync of the directory only leaves the rename less
    // durable across a power cut.
    if let Err(error) = std::fs::File::open(dir).and_then(|dir| dir.sync_all()) {
        tracing::warn!(%error, dir = %dir.display(), "cannot sync the state directory");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_hold_until_their_time_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let revocations = Revocations::load(Some(dir.path())).unwrap();
        assert!(!revocations.is_revoked(Some("j1"), Some("acme"), "alice"));
        let later = now() + 600;
        revocations
            .revoke(Revoked::Jti("j1".into()), later)
            .unwrap();
        let alice = Revoked::User {
            tenant: "acme".into(),
            user: "alice".into(),
        };
        revocations.revoke(alice.clone(), later).unwrap();
        // An entry already past is dropped at the next change.
        revocations
            .revoke(Revoked::Jti("old".into()), now() - 1)
            .unwrap();
        assert!(revocations.is_revoked(Some("j1"), None, "bob"));
        assert!(revocations.is_revoked(None, Some("acme"), "alice"));
        assert!(!revocations.is_revoked(None, Some("other"), "alice"));
        assert!(!revocations.is_revoked(Some("old"), None, "bob"));

        let reloaded = Revocations::load(Some(dir.path())).unwrap();
        assert!(reloaded.is_revoked(Some("j1"), None, "bob"));
        assert_eq!(reloaded.until(&alice), Some(later));
        assert_eq!(reloaded.lift(&alice).unwrap(), Some(later));
        assert_eq!(reloaded.lift(&alice).unwrap(), None);
        assert!(!Revocations::load(Some(dir.path())).unwrap().is_revoked(
            None,
            Some("acme"),
            "alice"
        ));
        assert_eq!(reloaded.len(), 1);
    }

    #[test]
    fn a_damaged_state_file_is_an_error_not_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        let error = Revocations::load(Some(dir.path())).err().unwrap();
        assert!(
            error.to_string().contains("is not a revocation list"),
            "{error}"
        );
    }
}
