//! Canonical JSON: object keys sorted at every level, no insignificant whitespace. Hashes and
//! signatures are computed over this form, so a store that reorders JSON keys (PostgreSQL jsonb)
//! or a client that serializes differently still produces the same bytes.

use serde_json::Value;

pub fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                if let Some(v) = map.get(key) {
                    write_canonical(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The canonical form as a string.
pub fn to_canonical(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

/// SHA-256 (lowercase hex) of the canonical form: a stable fingerprint of a JSON value.
pub fn sha256_hex(value: &Value) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(to_canonical(value).as_bytes()))
}
