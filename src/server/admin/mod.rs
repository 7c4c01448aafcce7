//! The admin HTTP port: metrics, health, models, stats and traces.
//!
//! Owns: one plain std thread (not a shard: a scrape must never take time
//! from the request path) that accepts connections and hands each to a
//! short-lived handler thread (at most [`HANDLERS_MAX`] at once, so a slow
//! `/debug/trace` does not hold up `/metrics`). It speaks just enough
//! HTTP/1.1: GET, and POST for the cache purge and the lifecycle changes
//! (`lifecycle.rs`), one request per connection (`Connection: close`),
//! a request head of at most [`REQUEST_BYTES_MAX`] read within
//! [`READ_TIMEOUT`]. It only reads what the shards publish (atomics), so it
//! may allocate freely.
//!
//! Endpoints: `/metrics` (Prometheus text 0.0.4), `/healthz`, `/readyz`,
//! `/v1/models`, `/v1/stats`, `/debug/trace?seconds=N`; POST
//! `/v1/cache/purge`, `/v1/repository/reload`, `/v1/models/NAME/load|unload|promote|rollback`,
//! `/v1/drain` (docs/OBSERVABILITY.md, docs/MODELS.md).
//!
//! The port is up before the slow start-up steps (model load and cascade
//! calibration, the L2 open scan, shard warm-up): meanwhile `/healthz`
//! answers 200, `/readyz` 503 `starting: <step>`, `/metrics` the process
//! gauges, and what needs the loaded models 503 `starting`.

mod http;
mod lifecycle;

pub use http::{fuzz_request_head, get, request, READ_TIMEOUT, REQUEST_BYTES_MAX};
use http::{parse_head, query_param, read_head, write_response, Request};

use crate::metrics::{self, trace, ShardMetrics};
use crate::model::load::Repository;
use crate::wire::Status;
use serde_json::json;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Handler threads at once; beyond it a connection gets 503 at once.
pub const HANDLERS_MAX: usize = 16;
/// Longest `/debug/trace` window.
pub const TRACE_SECONDS_MAX: f64 = 60.0;
/// `/debug/trace` windows at once (each holds a handler for its whole
/// window): beyond it, 503, so trace clients never take every handler
/// from `/metrics`.
pub const TRACES_MAX: usize = HANDLERS_MAX / 4;

/// What the admin thread reads. It exists from the start of start-up;
/// what start-up produces is set once it is there.
pub(crate) struct AdminState {
    /// The repository served now (set once the models are loaded,
    /// replaced by each reload).
    pub repo: RepoCell,
    /// Reloads, loads, unloads and drain (set once the shards serve).
    pub lifecycle: OnceLock<Arc<crate::server::lifecycle::Lifecycle>>,
    /// `POST /v1/drain` or SIGTERM with `drain_s`: not ready, still serving.
    pub draining: AtomicBool,
    /// The shards' counters and the cache (set before the shards start).
    pub serving: OnceLock<Serving>,
    /// The start-up step under way, for `/readyz`.
    step: Mutex<&'static str>,
    /// Be ready even when a model or ensemble was refused at load.
    ready_with_refused: bool,
    /// Every shard has warmed up and listens.
    pub ready: AtomicBool,
    /// The server's stop flag: set means shutting down (not ready).
    pub stop: Arc<AtomicBool>,
    pub backend: OnceLock<String>,
    pub started: Instant,
    pub trace_sample_rate: f64,
    exit: AtomicBool,
    handlers: AtomicUsize,
    /// `/debug/trace` windows open now.
    traces: AtomicUsize,
}

/// What the shards publish, once they exist.
pub(crate) struct Serving {
    pub metrics: Vec<Arc<ShardMetrics>>,
    /// The prediction cache, for `POST /v1/cache/purge` and the L2 gauges.
    pub cache: Arc<super::cache::CacheShared>,
    /// The learned-state sync's figures, with `[learning.share]`.
    pub learning: Option<Arc<super::share::ShareStats>>,
}

impl AdminState {
    pub fn new(
        stop: Arc<AtomicBool>,
        trace_sample_rate: f64,
        ready_with_refused: bool,
    ) -> AdminState {
        AdminState {
            repo: RepoCell::default(),
            lifecycle: OnceLock::new(),
            draining: AtomicBool::new(false),
            serving: OnceLock::new(),
            step: Mutex::new("starting up"),
            ready_with_refused,
            ready: AtomicBool::new(false),
            stop,
            backend: OnceLock::new(),
            started: Instant::now(),
            trace_sample_rate,
            exit: AtomicBool::new(false),
            handlers: AtomicUsize::new(0),
            traces: AtomicUsize::new(0),
        }
    }

    /// Name the start-up step under way (shown by `/readyz`).
    pub fn set_step(&self, step: &'static str) {
        *self.step.lock().unwrap_or_else(|e| e.into_inner()) = step;
    }

    fn step(&self) -> &'static str {
        *self.step.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The shards' counters; empty until they exist.
    fn metrics(&self) -> &[Arc<ShardMetrics>] {
        self.serving.get().map_or(&[], |s| &s.metrics)
    }
}

impl crate::server::lifecycle::Observer for AdminState {
    fn repository_changed(&self, repo: Arc<Repository>) {
        self.repo.set(repo);
    }
    fn draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
}

/// The repository served now; swapped whole by a reload (admin threads
/// only: never read on the request path).
#[derive(Default)]
pub(crate) struct RepoCell(Mutex<Option<Arc<Repository>>>);

impl RepoCell {
    pub fn get(&self) -> Option<Arc<Repository>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, repo: Arc<Repository>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(repo);
    }
}

/// Why the server is not ready (the body of a 503 from `/readyz`), or
/// `None` when it is. Kept apart from the routing so other reasons can be
/// added in one place.
fn not_ready(st: &AdminState) -> Option<String> {
    if st.stop.load(Ordering::Relaxed) {
        return Some("shutting down\n".into());
    }
    if st.draining.load(Ordering::Relaxed) {
        return Some("draining: still answering, stopping soon\n".into());
    }
    if !st.ready.load(Ordering::Acquire) {
        return Some(format!("starting: {}\n", st.step()));
    }
    if let Some(why) = st.serving.get().and_then(|s| s.cache.not_ready_reason()) {
        return Some(format!("{why}\n"));
    }
    refused_reason(st)
}

/// Models and ensembles refused at load: not ready unless the operator
/// opted into partial readiness (`ready_with_refused`).
fn refused_reason(st: &AdminState) -> Option<String> {
    let repo = st.repo.get()?;
    if repo.errors.is_empty() || st.ready_with_refused {
        return None;
    }
    let mut why = format!(
        "refused at load: {} model(s), {} ensemble(s) (set ready_with_refused = true to be ready with the rest)\n",
        repo.refused_models, repo.refused_ensembles
    );
    for e in &repo.errors {
        why.push_str(e);
        why.push('\n');
    }
    Some(why)
}

/// `beast_ready` and the refused-target gauges, appended to `/metrics`.
fn render_readiness(out: &mut String, st: &AdminState) {
    use std::fmt::Write as _;
    let (models, ensembles) = st
        .repo
        .get()
        .map_or((0, 0), |r| (r.refused_models, r.refused_ensembles));
    let gauges = [
        (
            "beast_ready",
            "1 while /readyz answers 200 (ready to serve), else 0.",
            usize::from(not_ready(st).is_none()),
        ),
        (
            "beast_models_refused",
            "Model folders and versions refused at load (see /v1/models \"refused\").",
            models,
        ),
        (
            "beast_ensembles_refused",
            "Ensembles refused at load (see /v1/models \"refused\").",
            ensembles,
        ),
    ];
    for (name, help, v) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
}

/// The running admin thread.
pub(crate) struct Admin {
    pub addr: SocketAddr,
    pub state: Arc<AdminState>,
    thread: Option<JoinHandle<()>>,
}

impl Admin {
    /// Bind `addr` and start serving.
    pub fn spawn(addr: SocketAddr, state: Arc<AdminState>) -> Result<Admin, String> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            format!("admin_listen {addr}: {e} (set admin_listen to another ADDR:PORT, or \"off\")")
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("admin_listen {addr}: {e}"))?;
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("beast-admin".into())
            .spawn(move || accept_loop(listener, st))
            .map_err(|e| format!("admin thread: {e}"))?;
        Ok(Admin {
            addr,
            state,
            thread: Some(thread),
        })
    }

    /// Stop accepting and join the accept thread (handlers in flight finish on their own).
    pub fn shutdown(mut self) {
        self.state.exit.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, st: Arc<AdminState>) {
    for conn in listener.incoming() {
        if st.exit.load(Ordering::SeqCst) {
            break;
        }
        let Ok(mut stream) = conn else {
            // EMFILE and friends: back off instead of spinning.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        if st.handlers.fetch_add(1, Ordering::SeqCst) >= HANDLERS_MAX {
            st.handlers.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = write_response(&mut stream, 503, "text/plain", b"busy\n");
            continue;
        }
        let st2 = st.clone();
        let spawned = std::thread::Builder::new()
            .name("beast-admin-req".into())
            .spawn(move || {
                handle(stream, &st2);
                st2.handlers.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            st.handlers.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn handle(mut stream: TcpStream, st: &AdminState) {
    let (code, ctype, body) = match read_head(&mut stream).as_deref().and_then(parse_head) {
        None => (400, "text/plain", "bad request\n".to_string()),
        Some(r) if r.method == "POST" && r.path == "/v1/cache/purge" => purge(&r, st),
        Some(r) if r.method != "GET" => match lifecycle::route(&r, st) {
            Some(answer) => answer,
            None => (
                405,
                "text/plain",
                "only GET (and POST /v1/cache/purge, /v1/repository/reload, /v1/models/NAME/load|unload, /v1/drain)\n".to_string(),
            ),
        },
        Some(r) => route(&r, st),
    };
    let _ = write_response(&mut stream, code, ctype, body.as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

const JSON: &str = "application/json";

/// `POST /v1/cache/purge?target=NAME`: drop every cached answer of NAME on
/// every core (its L1 entries become unreachable, its L2 slots are cleared).
fn purge(r: &Request<'_>, st: &AdminState) -> (u16, &'static str, String) {
    let Some(cache) = st.serving.get().map(|s| &s.cache) else {
        return (503, "text/plain", "starting\n".into());
    };
    match query_param(r.query, "target") {
        None => (
            400,
            "text/plain",
            "target: required, e.g. /v1/cache/purge?target=digits\n".into(),
        ),
        Some(t) => match cache.purge(t) {
            Ok(n) => (
                200,
                JSON,
                serde_json::json!({"target": t, "l2_entries_removed": n}).to_string(),
            ),
            Err(e) => (404, "text/plain", format!("{e}\n")),
        },
    }
}

fn route(r: &Request<'_>, st: &AdminState) -> (u16, &'static str, String) {
    match r.path {
        "/metrics" => {
            let mut text = metrics::prometheus::render(st.metrics(), &info(st));
            if let Some(l2) = st.serving.get().and_then(|s| s.cache.l2.as_ref()) {
                metrics::prometheus::render_l2(&mut text, &l2.stats());
            }
            if let Some(cache) = st.serving.get().map(|s| &s.cache) {
                if cache.l2_status().is_some() {
                    metrics::prometheus::render_l2_enabled(&mut text, cache.l2.is_some());
                }
                if let Some(l3) = &cache.l3 {
                    metrics::prometheus::render_l3(&mut text, &l3.stats);
                }
            }
            if let Some(l) = st.serving.get().and_then(|s| s.learning.as_ref()) {
                l.render(&mut text);
            }
            render_readiness(&mut text, st);
            if let Some(l) = st.lifecycle.get() {
                l.render_metrics(&mut text);
            }
            (200, metrics::prometheus::CONTENT_TYPE, text)
        }
        "/healthz" => (200, "text/plain", "ok\n".into()),
        "/readyz" => match not_ready(st) {
            Some(why) => (503, "text/plain", why),
            None => {
                // Details that do not make the server unready (it computes
                // when L3 is away).
                let l3 = st.serving.get().and_then(|s| s.cache.l3_status());
                let body = match l3 {
                    Some(l3) => format!("ready\n{l3}\n"),
                    None => "ready\n".into(),
                };
                (200, "text/plain", body)
            }
        },
        "/v1/models" => match st.repo.get() {
            Some(repo) => {
                let mut v = models_json(&repo);
                if let Some(l) = st.lifecycle.get() {
                    v["lifecycle"] = l.status_json();
                }
                (200, JSON, v.to_string())
            }
            None => (503, "text/plain", "starting\n".into()),
        },
        "/v1/stats" => {
            let i = info(st);
            let s = metrics::stats::snapshot(
                st.metrics(),
                &i.version,
                &i.backend,
                st.started.elapsed().as_secs_f64(),
                i.process,
            );
            let mut v = serde_json::to_value(&s).unwrap_or_default();
            let l2 = st.serving.get().and_then(|s| s.cache.l2_status());
            if let (Some(o), Some(l2)) = (v.as_object_mut(), l2) {
                o.insert("cache_l2".into(), l2);
            }
            (200, JSON, v.to_string())
        }
        "/debug/trace" => {
            let secs = match query_param(r.query, "seconds").map(|s| s.parse::<f64>()) {
                None => 1.0,
                Some(Ok(s)) if (0.0..=TRACE_SECONDS_MAX).contains(&s) => s,
                Some(_) => {
                    return (
                        400,
                        "text/plain",
                        format!("seconds: expected a number within 0..={TRACE_SECONDS_MAX}\n"),
                    )
                }
            };
            if st.traces.fetch_add(1, Ordering::SeqCst) >= TRACES_MAX {
                st.traces.fetch_sub(1, Ordering::SeqCst);
                return (
                    503,
                    "text/plain",
                    "busy: too many trace windows open\n".into(),
                );
            }
            let v = trace_json(st, secs).to_string();
            st.traces.fetch_sub(1, Ordering::SeqCst);
            (200, JSON, v)
        }
        _ => (404, "text/plain", "not found\n".into()),
    }
}

fn info(st: &AdminState) -> metrics::prometheus::Info {
    metrics::prometheus::Info {
        version: env!("CARGO_PKG_VERSION").to_string(),
        backend: st.backend.get().cloned().unwrap_or_default(),
        process: metrics::process::read(),
    }
}

fn models_json(repo: &Repository) -> serde_json::Value {
    let models: Vec<_> = repo
        .models
        .values()
        .flatten()
        .map(|m| {
            let layers: Vec<_> = m
                .layers
                .iter()
                .map(|l| json!({"in": l.in_dim, "out": l.out_dim, "activation": l.activation, "layer_norm": l.layer_norm.is_some()}))
                .collect();
            json!({
                "name": m.name,
                "version": m.version,
                "digest": m.short_digest(),
                "input_width": m.input_width,
                "output_width": m.output_width,
                "layers": layers,
                "output": m.output,
                "task": m.task,
                "classes": m.io.classes,
                "binary": m.io.binary,
                "preprocess": m.io.preprocess.as_ref().map(|p| p.describe()),
                "flops_per_row": m.flops_per_row(),
                "kind": if m.forest.is_some() { "trees" } else { "mlp" },
                "node_visits_per_row": m.node_visits_per_row(),
                "batch": {
                    "max_batch": m.batch.max_batch,
                    "min_batch": m.batch.min_batch,
                    "max_queue_delay_us": m.batch.max_queue_delay_us,
                    "queue_rows_max": m.batch.queue_rows_max,
                },
            })
        })
        .collect();
    let ensembles: Vec<_> = repo
        .ensembles
        .values()
        .map(|e| {
            // The members agree on task and class names (checked at load).
            let first = e.members.first().and_then(|m| repo.model(m, None));
            json!({
                "name": e.name,
                "members": e.members,
                "combiner": e.combiner,
                "weights": e.weights,
                "task": first.map(|m| m.task),
                "classes": first.map(|m| m.io.classes.clone()).unwrap_or_default(),
            })
        })
        .collect();
    json!({"models": models, "ensembles": ensembles, "refused": repo.errors})
}

/// Wait `secs`, then gather the records that arrived in that window (all
/// records in the rings when `secs` is 0) as Chrome trace-event JSON.
fn trace_json(st: &AdminState, secs: f64) -> serde_json::Value {
    let t0 = trace::since_epoch_ns(Instant::now());
    let written0: Vec<u64> = st.metrics().iter().map(|m| m.trace.written()).collect();
    if secs > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(secs));
    }
    let mut records = Vec::new();
    let mut buf = Vec::new();
    let mut overwritten = 0u64;
    for (m, w0) in st.metrics().iter().zip(&written0) {
        buf.clear();
        m.trace.read(&mut buf);
        let core = m.core;
        records.extend(
            buf.iter()
                .filter(|r| secs == 0.0 || r.arrival_ns >= t0)
                .map(|r| (core, *r)),
        );
        overwritten += (m.trace.written() - w0).saturating_sub(m.trace.capacity() as u64);
    }
    let targets = st
        .metrics()
        .first()
        .map(|m| m.targets.clone())
        .unwrap_or_default();
    let name = |t: u16| targets.name(t).to_string();
    let status = |s: u8| Status::ALL.get(s as usize).map_or("unknown", |s| s.label());
    let mut v = trace::chrome_trace(&mut records, &name, &status);
    let note = if st.trace_sample_rate > 0.0 {
        "sampled requests; tid = core * 1000 + lane"
    } else {
        "tracing is off: set trace_sample_rate > 0 in the config"
    };
    v["otherData"] = json!({
        "seconds": secs,
        "sample_rate": st.trace_sample_rate,
        "records": records.len(),
        "overwritten": overwritten,
        "note": note,
    });
    v
}
