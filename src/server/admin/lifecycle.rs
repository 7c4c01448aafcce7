//! The admin port's lifecycle endpoints (all POST, parameters in the
//! query string; docs/MODELS.md "Lifecycle"):
//! - `/v1/repository/reload`: rescan the repository;
//! - `/v1/models/NAME/load[?version=N]`, `/v1/models/NAME/unload[?version=N]`;
//! - `/v1/models/NAME/promote`, `/v1/models/NAME/rollback`: decide a
//!   running rollout by hand;
//! - `/v1/drain[?seconds=N]`: not ready at once, stop after N seconds
//!   (default `drain_s`).
//!
//! A change answers 200 with what it did once every shard serves it, or
//! 409 with every reason it was refused (each naming the file); the
//! generation served is then unchanged.

use super::http::{query_param, Request};
use super::{AdminState, JSON};
use crate::server::lifecycle::{Change, Lifecycle};
use serde_json::json;

/// The answer to a lifecycle POST, or `None` when `r` is not one.
pub(super) fn route(r: &Request<'_>, st: &AdminState) -> Option<(u16, &'static str, String)> {
    if r.method != "POST" {
        return None;
    }
    let change = if r.path == "/v1/repository/reload" {
        Change::Rescan
    } else if r.path == "/v1/drain" {
        return Some(drain(r, st));
    } else {
        let rest = r.path.strip_prefix("/v1/models/")?;
        let (name, verb) = rest.rsplit_once('/')?;
        if name.is_empty() || name.contains('/') {
            return None;
        }
        let version = match query_param(r.query, "version").map(str::parse::<u32>) {
            None | Some(Ok(0)) => None,
            Some(Ok(v)) => Some(v),
            Some(Err(_)) => {
                return Some((
                    400,
                    "text/plain",
                    "version: expected a positive integer\n".into(),
                ))
            }
        };
        let name = name.to_string();
        if verb == "promote" || verb == "rollback" {
            let Some(l) = st.lifecycle.get() else {
                return Some((503, "text/plain", "starting\n".into()));
            };
            let trigger = format!("POST {}", r.path);
            return Some(answer(
                l,
                l.decide(&name, verb == "promote", "by hand", &trigger),
            ));
        }
        match verb {
            "load" => Change::Load { name, version },
            "unload" => Change::Unload { name, version },
            _ => return None,
        }
    };
    let Some(l) = st.lifecycle.get() else {
        return Some((503, "text/plain", "starting\n".into()));
    };
    let trigger = format!("POST {}", r.path);
    Some(answer(l, l.apply(&change, &trigger)))
}

fn answer(
    l: &Lifecycle,
    r: Result<crate::server::lifecycle::Applied, String>,
) -> (u16, &'static str, String) {
    match r {
        Ok(a) => (200, JSON, a.to_json().to_string()),
        Err(e) => (
            409,
            JSON,
            json!({
                "refused": e.lines().collect::<Vec<_>>(),
                "generation": l.generation(),
                "note": "nothing was applied; the generation above keeps serving",
            })
            .to_string(),
        ),
    }
}

fn drain(r: &Request<'_>, st: &AdminState) -> (u16, &'static str, String) {
    let Some(l) = st.lifecycle.get() else {
        return (503, "text/plain", "starting\n".into());
    };
    let secs = match query_param(r.query, "seconds").map(str::parse::<f64>) {
        None => l.drain_s(),
        Some(Ok(s)) if s.is_finite() && (0.0..=3600.0).contains(&s) => s,
        Some(_) => {
            return (
                400,
                "text/plain",
                "seconds: expected a number within 0..=3600\n".into(),
            )
        }
    };
    let started = l.drain(secs, "POST /v1/drain");
    (
        200,
        JSON,
        json!({"draining": true, "seconds": secs, "already_draining": !started}).to_string(),
    )
}
