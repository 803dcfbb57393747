//! A route's identity rules applied to a verified identity: which tenant it may act for, and
//! which conversation it opens.

use super::refusal::Refusal;
use crate::auth::{Identity, is_passable};
use crate::config::settings::{CONVERSATION_PARAM, ConversationMode, RouteSettings, TenantRule};
use crate::query;

/// The `conversation_id` the client's query names (at most once; empty counts as none).
pub(super) fn query_conversation(query: Option<&str>) -> Result<Option<String>, Refusal> {
    let mut named = query::pairs(query.unwrap_or(""))
        .filter(|pair| pair.key == CONVERSATION_PARAM)
        .map(|pair| pair.value().into_owned());
    let first = named.next().filter(|c| !c.is_empty());
    if named.next().is_some() {
        return Err(Refusal::BadHandshake("conversation_id may be given once"));
    }
    if first.as_deref().is_some_and(|c| !is_passable(c)) {
        return Err(Refusal::BadHandshake(
            "conversation_id must be printable ASCII, at most 256 bytes",
        ));
    }
    Ok(first)
}

/// Applies the route's tenant and conversation rules to a verified identity.
pub(super) fn resolve(
    route: &RouteSettings,
    identity: &mut Identity,
    host: Option<&str>,
    path: &str,
    query_conversation: Option<String>,
) -> Result<(), Refusal> {
    // The token's values, before they are compared, counted or keyed on. (A route without a
    // policy has no identity: nothing to check.)
    let passable = |value: &Option<String>| value.as_deref().is_none_or(is_passable);
    if route.auth.is_some()
        && (!is_passable(&identity.user)
            || !passable(&identity.tenant)
            || !passable(&identity.conversation))
    {
        return Err(Refusal::TokenInvalid(
            "an identity claim is not printable ASCII of at most 256 bytes",
        ));
    }
    resolve_tenant(route, identity, host, path)?;
    identity.conversation = match (
        route.conversation,
        identity.conversation.take(),
        query_conversation,
    ) {
        (ConversationMode::None, _, _) => None,
        (_, Some(token), Some(query)) if token != query => {
            return Err(Refusal::ConversationNotAllowed);
        }
        (_, Some(token), _) => Some(token),
        (ConversationMode::Token, None, _) => return Err(Refusal::ConversationRequired),
        (ConversationMode::QueryOrToken, None, query) => query,
        (ConversationMode::Generate, None, Some(query)) => Some(query),
        (ConversationMode::Generate, None, None) => Some(uuid::Uuid::new_v4().to_string()),
    };
    Ok(())
}

fn resolve_tenant(
    route: &RouteSettings,
    identity: &mut Identity,
    host: Option<&str>,
    path: &str,
) -> Result<(), Refusal> {
    let bound_tenant = match &route.tenant {
        TenantRule::Optional | TenantRule::Required => None,
        TenantRule::Pin(tenant) => Some(tenant.clone()),
        TenantRule::FromHost => {
            let label = host
                .and_then(|h| h.split('.').next())
                .filter(|label| !label.is_empty())
                .ok_or(Refusal::TenantNotAllowed("the host names no tenant"))?;
            Some(label.to_ascii_lowercase())
        }
        TenantRule::FromPath(n) => {
            let segment = path
                .split('/')
                .filter(|s| !s.is_empty())
                .nth(n - 1)
                .ok_or(Refusal::TenantNotAllowed("the path names no tenant"))?;
            Some(segment.to_owned())
        }
    };
    match (bound_tenant, &identity.tenant) {
        (Some(bound), Some(claimed)) if !bound.eq_ignore_ascii_case(claimed) => {
            return Err(Refusal::TenantNotAllowed(
                "the token's tenant is not allowed here",
            ));
        }
        // One tenant, one spelling: the per-user cap, the session key, a revocation and the
        // upstream all see the tenant as the route names it.
        // (A path's spelling is the client's to choose, so there the token's stays.)
        (Some(bound), Some(_)) if !matches!(route.tenant, TenantRule::FromPath(_)) => {
            identity.tenant = Some(bound)
        }
        // Only a pinned tenant comes from the config. Host and path are client input: a
        // token that names no tenant cannot be bound to whatever tenant the client asks for.
        (Some(_), None) if !matches!(route.tenant, TenantRule::Pin(_)) => {
            return Err(Refusal::TenantRequired);
        }
        (Some(bound), None) => identity.tenant = Some(bound),
        _ => {}
    }
    if route.tenant == TenantRule::Required && identity.tenant.is_none() {
        return Err(Refusal::TenantRequired);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::settings::PathMatch;

    #[test]
    fn conversation_rules() {
        let mut r = RouteSettings::for_test(PathMatch::Exact("/".into()), None);
        let conv = |r: &RouteSettings, token: Option<&str>, query: Option<&str>| {
            let mut id = Identity {
                user: "u".into(),
                conversation: token.map(str::to_owned),
                ..Default::default()
            };
            resolve(r, &mut id, None, "/", query.map(str::to_owned))
                .map(|()| id.conversation)
                .map_err(Refusal::reason)
        };
        assert_eq!(conv(&r, Some("c1"), None), Ok(Some("c1".into())));
        assert_eq!(conv(&r, Some("c1"), Some("c1")), Ok(Some("c1".into())));
        assert_eq!(
            conv(&r, Some("c1"), Some("c2")),
            Err("conversation_not_allowed")
        );
        assert_eq!(conv(&r, None, Some("c2")), Ok(Some("c2".into())));
        r.conversation = ConversationMode::Token;
        assert_eq!(conv(&r, None, Some("c2")), Err("conversation_required"));
        r.conversation = ConversationMode::Generate;
        assert_eq!(
            conv(&r, None, None).map(|c| c.map(|c| c.len())),
            Ok(Some(36))
        );
        r.conversation = ConversationMode::None;
        assert_eq!(conv(&r, Some("c1"), Some("c2")), Ok(None));
    }

    #[test]
    fn tenant_rules() {
        let mut r = RouteSettings::for_test(PathMatch::Prefix("/t".into()), None);
        let tenant = |r: &RouteSettings, token: Option<&str>, host: Option<&str>, path: &str| {
            let mut id = Identity {
                user: "u".into(),
                tenant: token.map(str::to_owned),
                ..Default::default()
            };
            resolve(r, &mut id, host, path, None)
                .map(|()| id.tenant)
                .map_err(Refusal::reason)
        };
        r.tenant = TenantRule::Required;
        assert_eq!(tenant(&r, None, None, "/t"), Err("tenant_required"));
        r.tenant = TenantRule::Pin("acme".into());
        assert_eq!(tenant(&r, None, None, "/t"), Ok(Some("acme".into())));
        assert_eq!(
            tenant(&r, Some("evil"), None, "/t"),
            Err("tenant_not_allowed")
        );
        r.tenant = TenantRule::FromHost;
        assert_eq!(
            tenant(&r, Some("acme"), Some("acme.chat.example.com"), "/t"),
            Ok(Some("acme".into()))
        );
        assert_eq!(
            tenant(&r, Some("acme"), Some("evil.chat.example.com"), "/t"),
            Err("tenant_not_allowed")
        );
        assert_eq!(
            tenant(&r, None, Some("acme.chat.example.com"), "/t"),
            Err("tenant_required")
        );
        r.tenant = TenantRule::FromPath(2);
        assert_eq!(
            tenant(&r, Some("globex"), None, "/t/globex/chat"),
            Ok(Some("globex".into()))
        );
        assert_eq!(
            tenant(&r, None, None, "/t/globex/chat"),
            Err("tenant_required")
        );
        assert_eq!(tenant(&r, None, None, "/t"), Err("tenant_not_allowed"));
    }

    #[test]
    fn a_conversation_may_be_named_once() {
        assert_eq!(
            query_conversation(Some("conversation_id=c1")),
            Ok(Some("c1".into()))
        );
        assert_eq!(query_conversation(Some("conversation_id=")), Ok(None));
        assert_eq!(
            query_conversation(Some("conversation_id=c1&conversation_id=c2"))
                .map_err(Refusal::reason),
            Err("bad_handshake")
        );
    }
}
