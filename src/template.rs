//! Identity templates for injected headers and upstream query parameters:
//! `{user}`, `{tenant}`, `{conversation}`, `{claim.NAME}`; `{{` and `}}` are literal braces.
//! Parsed once at config load so that rendering is a walk over ready pieces.

use crate::auth::Identity;
use crate::auth::claims::claim_text;

/// A template that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TemplateError {
    #[error("unmatched '}}' in template {0:?} (write '}}}}' for a literal brace)")]
    UnmatchedClose(String),
    #[error("unclosed '{{' in template {0:?}")]
    Unclosed(String),
    #[error(
        "unknown placeholder {{{name}}} in template {text:?}: expected {{user}}, {{tenant}}, {{conversation}} or {{claim.NAME}}"
    )]
    UnknownPlaceholder { name: String, text: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    User,
    Tenant,
    Conversation,
    Claim(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    pieces: Vec<Piece>,
}

impl Template {
    pub(crate) fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(position) = rest.find(['{', '}']) {
            literal.push_str(&rest[..position]);
            let tail = &rest[position..];
            if let Some(after) = tail.strip_prefix("{{") {
                literal.push('{');
                rest = after;
            } else if let Some(after) = tail.strip_prefix("}}") {
                literal.push('}');
                rest = after;
            } else if tail.starts_with('}') {
                return Err(TemplateError::UnmatchedClose(text.to_owned()));
            } else {
                let end = tail
                    .find('}')
                    .ok_or_else(|| TemplateError::Unclosed(text.to_owned()))?;
                let name = &tail[1..end];
                let piece = match name {
                    "user" => Piece::User,
                    "tenant" => Piece::Tenant,
                    "conversation" => Piece::Conversation,
                    _ => match name.strip_prefix("claim.") {
                        Some(claim) if !claim.is_empty() => Piece::Claim(claim.to_owned()),
                        _ => {
                            return Err(TemplateError::UnknownPlaceholder {
                                name: name.to_owned(),
                                text: text.to_owned(),
                            });
                        }
                    },
                };
                if !literal.is_empty() {
                    pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                }
                pieces.push(piece);
                rest = &tail[end + 1..];
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        Ok(Self { pieces })
    }

    /// Renders the template; `None` when a placeholder has no value, so that a header or
    /// parameter built from it is left out rather than sent half-filled.
    pub(crate) fn render(&self, identity: &Identity) -> Option<String> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => out.push_str(text),
                Piece::User if !identity.user.is_empty() => out.push_str(&identity.user),
                Piece::Tenant => out.push_str(identity.tenant.as_deref()?),
                Piece::Conversation => out.push_str(identity.conversation.as_deref()?),
                Piece::Claim(name) => out.push_str(&claim_text(&identity.claims, name)?),
                Piece::User => return None,
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_placeholders_and_escapes() {
        let mut identity = Identity {
            user: "u1".into(),
            tenant: Some("acme".into()),
            ..Default::default()
        };
        std::sync::Arc::make_mut(&mut identity.claims).insert("role".into(), "admin".into());
        let t = Template::parse("{tenant}/{user} {{x}} {claim.role}").unwrap();
        assert_eq!(t.render(&identity).as_deref(), Some("acme/u1 {x} admin"));
        let missing = Template::parse("{conversation}").unwrap();
        assert_eq!(missing.render(&identity), None);
    }

    #[test]
    fn refuses_bad_templates() {
        for bad in ["{nope}", "{user", "a}b", "{claim.}"] {
            assert!(Template::parse(bad).is_err(), "{bad:?}");
        }
    }
}
