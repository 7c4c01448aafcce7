//! Prometheus text exposition format 0.0.4 of every shard's metrics.
//!
//! Runs on the admin thread: it may allocate. Counters are summed across
//! shards; per-core families keep one series per shard.

use super::histogram::{HistogramSnapshot, BATCH_BOUNDS_ROWS, DURATION_BOUNDS_US};
use super::process::Process;
use super::{CacheTier, ShardMetrics, Shed, TargetKind, TimedOut};
use crate::wire::Status;
use std::fmt::Write as _;
use std::sync::Arc;

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Process-wide facts that are not per-shard counters.
#[derive(Debug, Clone, Default)]
pub struct Info {
    pub version: String,
    pub backend: String,
    pub process: Option<Process>,
}

/// Escape a label value: backslash, double quote and newline.
pub fn escape_label(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// `name{k="v",...} value`
fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            escape_label(v, out);
            out.push('"');
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Bucket bound as Prometheus wants it (`le="0.00025"`); `div` converts
/// the stored unit (µs → s: 1e6). Division, not multiplication by 1e-6,
/// so 250 µs prints as 0.00025 and not 0.00025000000000000006.
fn le(bound: u64, div: f64) -> String {
    if div == 1.0 {
        bound.to_string()
    } else {
        format!("{}", bound as f64 / div)
    }
}

fn histogram(out: &mut String, name: &str, label: (&str, &str), h: &HistogramSnapshot, div: f64) {
    let cum = h.cumulative();
    let bucket = format!("{name}_bucket");
    for (i, &b) in h.bounds.iter().enumerate() {
        sample(out, &bucket, &[label, ("le", &le(b, div))], cum[i]);
    }
    let count = cum.last().copied().unwrap_or(0);
    sample(out, &bucket, &[label, ("le", "+Inf")], count);
    if div == 1.0 {
        sample(out, &format!("{name}_sum"), &[label], h.sum);
    } else {
        sample(out, &format!("{name}_sum"), &[label], h.sum as f64 / div);
    }
    sample(out, &format!("{name}_count"), &[label], count);
}

fn merged(
    shards: &[Arc<ShardMetrics>],
    bounds: &'static [u64],
    f: impl Fn(&ShardMetrics) -> Option<HistogramSnapshot>,
) -> HistogramSnapshot {
    let mut acc = HistogramSnapshot::empty(bounds);
    for s in shards {
        if let Some(h) = f(s) {
            acc.merge(&h);
        }
    }
    acc
}

fn sum(shards: &[Arc<ShardMetrics>], f: impl Fn(&ShardMetrics) -> u64) -> u64 {
    shards.iter().map(|s| f(s)).sum()
}

/// Render every metric family.
pub fn render(shards: &[Arc<ShardMetrics>], info: &Info) -> String {
    let mut out = String::with_capacity(16 << 10);
    let o = &mut out;
    let targets = shards
        .first()
        .map(|s| s.targets.clone())
        .unwrap_or_default();

    header(o, "beast_up", "gauge", "1 while the server process runs.");
    sample(o, "beast_up", &[], 1);
    header(
        o,
        "beast_build_info",
        "gauge",
        "Build facts as labels; the value is always 1.",
    );
    sample(
        o,
        "beast_build_info",
        &[("version", &info.version), ("backend", &info.backend)],
        1,
    );

    header(
        o,
        "beast_requests_total",
        "counter",
        "Responses sent, by target (model or ensemble; _unknown when none matched) and status.",
    );
    for (t, name) in targets.names.iter().enumerate() {
        for s in Status::ALL {
            sample(
                o,
                "beast_requests_total",
                &[("target", name), ("status", s.label())],
                sum(shards, |m| m.requests_of(t, s)),
            );
        }
    }

    header(
        o,
        "beast_request_duration_seconds",
        "histogram",
        "Server time per request, from frame read to response encoded.",
    );
    for (t, name) in targets.names.iter().enumerate() {
        let h = merged(shards, DURATION_BOUNDS_US, |m| m.request_duration_of(t));
        histogram(
            o,
            "beast_request_duration_seconds",
            ("target", name),
            &h,
            1e6,
        );
    }
    header(
        o,
        "beast_queue_duration_seconds",
        "histogram",
        "Time a successful request waited in its batch queue (ensembles: slowest member).",
    );
    for (t, name) in targets.names.iter().enumerate() {
        let h = merged(shards, DURATION_BOUNDS_US, |m| m.queue_duration_of(t));
        histogram(o, "beast_queue_duration_seconds", ("target", name), &h, 1e6);
    }
    let models = || {
        targets
            .names
            .iter()
            .zip(&targets.kinds)
            .enumerate()
            .filter(|(_, (_, k))| **k == TargetKind::Model)
    };
    header(
        o,
        "beast_compute_duration_seconds",
        "histogram",
        "Backend time per batch, by model.",
    );
    for (m, (name, _)) in models() {
        let h = merged(shards, DURATION_BOUNDS_US, |s| s.compute_duration_of(m));
        histogram(
            o,
            "beast_compute_duration_seconds",
            ("model", name),
            &h,
            1e6,
        );
    }
    header(
        o,
        "beast_batch_size",
        "histogram",
        "Rows per batch, by model.",
    );
    for (m, (name, _)) in models() {
        let h = merged(shards, BATCH_BOUNDS_ROWS, |s| s.batch_size_of(m));
        histogram(o, "beast_batch_size", ("model", name), &h, 1.0);
    }

    header(
        o,
        "beast_requests_shed_total",
        "counter",
        "Requests answered OVERLOADED, by reason.",
    );
    for r in Shed::ALL {
        sample(
            o,
            "beast_requests_shed_total",
            &[("reason", r.label())],
            sum(shards, |m| m.shed[r as usize].get()),
        );
    }

    header(
        o,
        "beast_batch_rows_dropped_total",
        "counter",
        "Queued rows dropped before compute, by reason: expired (deadline passed or would pass during the batch), cancelled (nobody would read the answer).",
    );
    for (reason, f) in [
        (
            "expired",
            (|m: &ShardMetrics| m.rows_dropped_expired.get()) as fn(&ShardMetrics) -> u64,
        ),
        ("cancelled", |m: &ShardMetrics| {
            m.rows_dropped_cancelled.get()
        }),
    ] {
        sample(
            o,
            "beast_batch_rows_dropped_total",
            &[("reason", reason)],
            sum(shards, f),
        );
    }
    header(
        o,
        "beast_admission_refused_total",
        "counter",
        "Requests refused at once because their predicted queue wait exceeded their budget, by the status answered.",
    );
    for (status, f) in [
        (
            "deadline_exceeded",
            (|m: &ShardMetrics| m.admission_refused_deadline.get()) as fn(&ShardMetrics) -> u64,
        ),
        ("overloaded", |m: &ShardMetrics| {
            m.admission_refused_overloaded.get()
        }),
    ] {
        sample(
            o,
            "beast_admission_refused_total",
            &[("status", status)],
            sum(shards, f),
        );
    }

    header(
        o,
        "beast_cache_hits_total",
        "counter",
        "Prediction cache hits, by tier.",
    );
    for t in CacheTier::ALL {
        sample(
            o,
            "beast_cache_hits_total",
            &[("tier", t.label())],
            sum(shards, |m| m.cache_hits(t).get()),
        );
    }
    header(
        o,
        "beast_cache_misses_total",
        "counter",
        "Prediction cache lookups that found nothing.",
    );
    sample(
        o,
        "beast_cache_misses_total",
        &[],
        sum(shards, |m| m.cache_misses.get()),
    );
    header(
        o,
        "beast_cache_coalesced_total",
        "counter",
        "Requests answered by an identical request already in flight.",
    );
    sample(
        o,
        "beast_cache_coalesced_total",
        &[],
        sum(shards, |m| m.cache_coalesced.get()),
    );
    header(
        o,
        "beast_cache_inserts_total",
        "counter",
        "Answers written into the prediction cache.",
    );
    sample(
        o,
        "beast_cache_inserts_total",
        &[],
        sum(shards, |m| m.cache_inserts.get()),
    );

    let per_core =
        |o: &mut String, name: &str, kind: &str, help: &str, f: &dyn Fn(&ShardMetrics) -> u64| {
            header(o, name, kind, help);
            for s in shards {
                sample(o, name, &[("core", &s.core.to_string())], f(s));
            }
        };
    per_core(
        o,
        "beast_core_requests_total",
        "counter",
        "Responses sent, by core.",
        &|m| m.responses.iter().map(|c| c.get()).sum(),
    );
    per_core(
        o,
        "beast_in_flight_requests",
        "gauge",
        "Requests received and not yet answered, by core.",
        &|m| m.in_flight(),
    );
    per_core(
        o,
        "beast_connections_open",
        "gauge",
        "Open client connections, by core.",
        &|m| m.connections_open(),
    );
    per_core(
        o,
        "beast_connections_total",
        "counter",
        "Client connections accepted, by core.",
        &|m| m.connections_accepted.get(),
    );
    per_core(
        o,
        "beast_connections_refused_total",
        "counter",
        "Connections closed at once because the core had connections_per_shard_max open.",
        &|m| m.connections_refused.get(),
    );
    per_core(
        o,
        "beast_connections_dropped_total",
        "counter",
        "Connections closed for a protocol violation (bad frame length).",
        &|m| m.connections_dropped.get(),
    );
    header(
        o,
        "beast_connections_timed_out_total",
        "counter",
        "Connections closed on a timer, by reason: frame (frame_timeout_ms), idle (idle_timeout_ms), write_stall (write_stall_timeout_ms).",
    );
    for r in TimedOut::ALL {
        sample(
            o,
            "beast_connections_timed_out_total",
            &[("reason", r.label())],
            sum(shards, |m| m.connections_timed_out[r as usize].get()),
        );
    }
    per_core(
        o,
        "beast_connection_pending_bytes_peak",
        "gauge",
        "Most answer bytes one connection has held unwritten at once, by core (bounded by pending_bytes_per_connection_max).",
        &|m| m.pending_bytes_peak.get(),
    );

    if let Some(p) = info.process {
        header(
            o,
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
        );
        sample(o, "process_cpu_seconds_total", &[], p.cpu_seconds);
        header(
            o,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
        );
        sample(o, "process_resident_memory_bytes", &[], p.resident_bytes);
    }
    out
}

/// Whether the configured L2 file is in use (0: the server runs with L1
/// only; the reason is in the log, /readyz and /v1/stats). Rendered only
/// when an L2 file is configured.
pub fn render_l2_enabled(out: &mut String, enabled: bool) {
    let name = "beast_cache_l2_enabled";
    header(
        out,
        name,
        "gauge",
        "1 when the configured L2 cache file is in use, 0 when the server runs with L1 only.",
    );
    sample(out, name, &[], enabled as u64);
}

/// The L3 tier (Redis/Valkey): its breaker as a gauge and its thread's
/// counters (read from atomics by the admin thread).
pub fn render_l3(out: &mut String, s: &crate::cache::l3::L3Stats) {
    use std::sync::atomic::Ordering::Relaxed;
    let name = "beast_cache_l3_breaker_open";
    header(
        out,
        name,
        "gauge",
        "1 while the L3 circuit breaker is open (Redis slow or unreachable: requests compute), else 0.",
    );
    sample(out, name, &[], s.is_open() as u64);
    let name = "beast_cache_l3_lookups_total";
    header(
        out,
        name,
        "counter",
        "L3 lookups by outcome (sent, hit, miss, timeout = budget spent, skipped = not sent, cheaper = computing predicted quicker, corrupt).",
    );
    for (result, v) in [
        ("sent", &s.lookups),
        ("hit", &s.hits),
        ("miss", &s.misses),
        ("timeout", &s.timeouts),
        ("skipped", &s.skipped),
        ("cheaper", &s.cheaper),
        ("corrupt", &s.corrupt),
    ] {
        sample(out, name, &[("result", result)], v.load(Relaxed));
    }
    for (name, help, v) in [
        (
            "beast_cache_l3_fills_total",
            "Answers written to L3.",
            &s.fills,
        ),
        (
            "beast_cache_l3_batches_total",
            "L3 lookup round trips: one MGET, or one pipeline on a Redis Cluster (each carries the lookups queued at the time, at most 512).",
            &s.batches,
        ),
        (
            "beast_cache_l3_fills_dropped_total",
            "Answers not written to L3 (queue full).",
            &s.fills_dropped,
        ),
        (
            "beast_cache_l3_errors_total",
            "Redis errors and timeouts seen by the L3 thread.",
            &s.errors,
        ),
        (
            "beast_cache_l3_breaker_opens_total",
            "Times the L3 breaker opened.",
            &s.breaker_opens,
        ),
    ] {
        header(out, name, "counter", help);
        sample(out, name, &[], v.load(Relaxed));
    }
}

/// The shared L2 cache file's own counters and occupancy (read by the admin
/// thread from the file's atomics: O(1) at any file size).
pub fn render_l2(out: &mut String, s: &crate::cache::L2Stats) {
    let rows: [(&str, &str, &str, u64); 8] = [
        (
            "beast_cache_l2_evictions_total",
            "counter",
            "L2 inserts that replaced a live entry of another key.",
            s.evictions,
        ),
        (
            "beast_cache_l2_checksum_failures_total",
            "counter",
            "L2 slots whose checksum failed (torn by a crash or corrupted); never served.",
            s.checksum_failures,
        ),
        (
            "beast_cache_l2_torn_read_retries_total",
            "counter",
            "L2 reads retried because a writer was in the slot.",
            s.torn_read_retries,
        ),
        (
            "beast_cache_l2_expired_total",
            "counter",
            "L2 entries found past their TTL (answered as a miss).",
            s.expired,
        ),
        (
            "beast_cache_l2_insert_contended_total",
            "counter",
            "L2 inserts dropped because every candidate slot was being written.",
            s.insert_contended,
        ),
        (
            "beast_cache_l2_purged_total",
            "counter",
            "L2 entries removed by purges.",
            s.purged,
        ),
        (
            "beast_cache_l2_entries",
            "gauge",
            "Live entries in the L2 file.",
            s.occupancy,
        ),
        (
            "beast_cache_l2_slots",
            "gauge",
            "Slots in the L2 file.",
            s.capacity,
        ),
    ];
    for (name, kind, help, v) in rows {
        header(out, name, kind, help);
        sample(out, name, &[], v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_label_values() {
        let mut s = String::new();
        escape_label("a\"b\\c\nd", &mut s);
        assert_eq!(s, "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn le_labels() {
        assert_eq!(le(250, 1e6), "0.00025");
        assert_eq!(le(1_000_000, 1e6), "1");
        assert_eq!(le(10, 1e6), "0.00001");
        assert_eq!(le(16, 1.0), "16");
    }
}
