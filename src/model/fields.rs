//! Field helpers for the hand-walked TOML files (`model.toml`,
//! `ensembles.toml`, the tree manifest): each error names the full field
//! path. A leaf of `model/`, so that `manifest.rs` and `io.rs` both use it
//! without importing each other.

use serde::de::DeserializeOwned;
use toml::{Table, Value};

pub(crate) fn deny_unknown(t: &Table, path: &str, known: &[&str]) -> Result<(), String> {
    for k in t.keys() {
        if !known.contains(&k.as_str()) {
            let field = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            return Err(format!(
                "{field}: unknown field, expected one of {}",
                known.join(", ")
            ));
        }
    }
    Ok(())
}

pub(super) fn uint(v: &Value, path: &str) -> Result<u64, String> {
    match v {
        Value::Integer(i) if *i >= 0 => Ok(*i as u64),
        Value::Integer(i) => Err(format!("{path}: {i} must be >= 0")),
        other => Err(format!(
            "{path}: expected an integer, found {}",
            other.type_str()
        )),
    }
}

pub(super) fn float(v: &Value, path: &str) -> Result<f64, String> {
    match v {
        Value::Float(f) => Ok(*f),
        Value::Integer(i) => Ok(*i as f64),
        other => Err(format!(
            "{path}: expected a number, found {}",
            other.type_str()
        )),
    }
}

/// A string field naming an enum variant; serde's message lists the variants.
pub(super) fn enum_field<T: DeserializeOwned>(
    t: &Table,
    key: &str,
    path: &str,
) -> Result<Option<T>, String> {
    let Some(v) = t.get(key) else {
        return Ok(None);
    };
    if !v.is_str() {
        return Err(format!("{path}: expected a string, found {}", v.type_str()));
    }
    v.clone()
        .try_into::<T>()
        .map(Some)
        .map_err(|e| format!("{path}: {}", e.message().trim().replace('`', "\"")))
}
