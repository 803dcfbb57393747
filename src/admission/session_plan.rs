//! What a route's resume rules make of a handshake: no session, a new one, a client coming
//! back to a live one, or a session that cannot be had (told to the client after the upgrade).

use std::sync::Arc;

use super::refusal::Refusal;
use crate::auth::Identity;
use crate::config::settings::ResumeSettings;
use crate::query;
use crate::session::registry::{SessionEntry, SessionKey, Sessions};
use crate::session::{LAST_SEQ_PARAM, SESSION_PARAM, valid_session_id};
use crate::ws::close::NotResumable;

pub(super) enum Planned {
    /// Not a resumable session (no resume on the route, or no `session_id`).
    Plain,
    /// A new session under this id (reserved in the registry).
    New {
        entry: Arc<SessionEntry>,
        announce: Option<String>,
    },
    /// A client coming back to a live session.
    Resume {
        entry: Arc<SessionEntry>,
        last_seq: u64,
    },
    /// A session this edge does not know, which another edge of the cluster may hold.
    Elsewhere {
        key: SessionKey,
        last_seq: u64,
        /// The conversation the client named, if it named one.
        conversation: Option<String>,
    },
    /// A session that cannot be resumed (or started).
    Refuse(NotResumable),
}

/// `session_id` and `last_seq` from the query, each at most once.
fn session_params(query: Option<&str>) -> Result<(Option<String>, Option<u64>), Refusal> {
    let mut id = None;
    let mut last_seq = None;
    for pair in query::pairs(query.unwrap_or("")) {
        let (key, value) = (pair.key.as_ref(), pair.value());
        if key == SESSION_PARAM {
            if id.is_some() {
                return Err(Refusal::BadHandshake("session_id may be given once"));
            }
            if !valid_session_id(&value) {
                return Err(Refusal::BadHandshake(
                    "session_id must be 1 to 128 characters of A-Z a-z 0-9 - _ . ~",
                ));
            }
            id = Some(value.into_owned());
        } else if key == LAST_SEQ_PARAM {
            if last_seq.is_some() {
                return Err(Refusal::BadHandshake("last_seq may be given once"));
            }
            last_seq = Some(value.parse::<u64>().map_err(|_| {
                Refusal::BadHandshake("last_seq must be a count of messages received")
            })?);
        }
    }
    if last_seq.is_some() && id.is_none() {
        return Err(Refusal::BadHandshake("last_seq needs a session_id"));
    }
    Ok((id, last_seq))
}

/// `conversation_named`: the token or the query named the conversation (one the edge made up
/// cannot be asked for again, so a resume takes the session's). `ask_cluster`: a session this
/// edge does not know may be held by another edge.
#[allow(clippy::too_many_arguments)]
pub(super) fn plan(
    sessions: &Sessions,
    route: &str,
    settings: &ResumeSettings,
    identity: &Identity,
    query: Option<&str>,
    conversation_named: bool,
    ask_cluster: bool,
) -> Result<Planned, Refusal> {
    let (id, last_seq) = session_params(query)?;
    let id = match id {
        Some(id) => id,
        // The announcement tells the client the id the edge chose for it.
        None if settings.announce => uuid::Uuid::new_v4().to_string(),
        None => return Ok(Planned::Plain),
    };
    let key = SessionKey {
        route: route.to_owned(),
        tenant: identity.tenant.clone().unwrap_or_default(),
        user: identity.user.clone(),
        id,
    };
    let mut failed = None;
    if let Some(last_seq) = last_seq {
        let found = sessions.registry.find(&key).and_then(|entry| {
            if conversation_named && entry.conversation != identity.conversation {
                return Err(NotResumable::Conversation);
            }
            entry.check(last_seq)?;
            Ok(entry)
        });
        match found {
            Ok(entry) => return Ok(Planned::Resume { entry, last_seq }),
            Err(NotResumable::Unknown) if ask_cluster => {
                let conversation = identity.conversation.clone().filter(|_| conversation_named);
                return Ok(Planned::Elsewhere {
                    key,
                    last_seq,
                    conversation,
                });
            }
            // Told, then started afresh: never silently.
            Err(why) if settings.announce => failed = Some(why),
            Err(why) => return Ok(Planned::Refuse(why)),
        }
    }
    let id = key.id.clone();
    match sessions.registry.begin(key, identity.conversation.clone()) {
        // A live session that could not be resumed cannot be replaced either: the client
        // hears why it could not be resumed.
        Err(NotResumable::InUse) if failed.is_some() => {
            Ok(Planned::Refuse(failed.unwrap_or(NotResumable::InUse)))
        }
        Err(why) => Ok(Planned::Refuse(why)),
        Ok(entry) => {
            if let Some(why) = failed {
                sessions.metrics.resume(route, why.label());
            }
            Ok(Planned::New {
                entry,
                announce: settings.announce.then(|| {
                    let mut announce = serde_json::json!({
                        "type": "edge.session",
                        "session_id": id,
                        "resumed": false,
                    });
                    if let Some(why) = failed {
                        announce["reason"] = why.reason().into();
                    }
                    announce.to_string()
                }),
            })
        }
    }
}
