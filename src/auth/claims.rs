//! Claims as the edge reads them: the identity claims as text, and NumericDate and
//! string-or-array claims the way the verifiers judge them.

use serde_json::{Map, Value};

/// A token's claims.
pub(crate) type Claims = Map<String, Value>;

/// A claim as a string: strings as they are, numbers and booleans printed; empty counts as absent.
pub(crate) fn claim_string(claims: &Claims, name: &str) -> Option<String> {
    let text = match claims.get(name)? {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => return None,
    };
    (!text.is_empty()).then_some(text)
}

/// A claim for a `{claim.NAME}` template: scalars as text, arrays and objects as JSON.
pub(crate) fn claim_text(claims: &Claims, name: &str) -> Option<String> {
    match claims.get(name)? {
        Value::Null => None,
        Value::Array(_) | Value::Object(_) => claims.get(name).map(Value::to_string),
        _ => claim_string(claims, name),
    }
}

/// A registered claim as read for validation.
pub(crate) enum Parsed<T> {
    Value(T),
    /// Present, but not of the claim's type.
    Malformed,
    Absent,
}

/// A NumericDate as jsonwebtoken reads it: a non-negative integer, or a finite non-negative
/// number below 2^64, rounded (`null` is not one).
pub(crate) fn numeric(value: Option<&Value>) -> Parsed<u64> {
    match value {
        None => Parsed::Absent,
        Some(Value::Number(number)) => {
            if let Some(n) = number.as_u64() {
                Parsed::Value(n)
            } else if number.is_f64()
                && let Some(f) = number.as_f64()
                && f.is_finite()
                && f >= 0.0
                && f < u64::MAX as f64
            {
                Parsed::Value(f.round() as u64)
            } else {
                Parsed::Malformed
            }
        }
        Some(_) => Parsed::Malformed,
    }
}

/// A NumericDate in whole seconds, as the verifiers accept it (`exp: 1767225600.5` included).
pub(crate) fn numeric_date(value: &Value) -> Option<u64> {
    match numeric(Some(value)) {
        Parsed::Value(seconds) => Some(seconds),
        Parsed::Malformed | Parsed::Absent => None,
    }
}

/// `iss` or `aud`: a string, or an array of strings.
pub(crate) fn names(value: Option<&Value>) -> Parsed<Vec<&str>> {
    match value {
        None | Some(Value::Null) => Parsed::Absent,
        Some(Value::String(name)) => Parsed::Value(vec![name.as_str()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(Value::as_str)
            .collect::<Option<Vec<_>>>()
            .map_or(Parsed::Malformed, Parsed::Value),
        Some(_) => Parsed::Malformed,
    }
}
