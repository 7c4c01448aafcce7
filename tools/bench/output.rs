//! Reporting: the human table, one JSON object per run, CSV rows, the
//! classic HdrHistogram `.hgrm` percentile distribution, and the SVG plot of
//! latency percentiles against offered rate.

use super::admin::Delta;
use super::load::{Report, LATE_SLACK_US};
use beast::wire::Status;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// One finished run with the figures derived from it.
pub struct Summary {
    /// "run", "sweep 2/5", "search 3", ...
    pub label: String,
    /// "open/uniform", "open/poisson", "closed", "trace".
    pub mode: String,
    pub targets: String,
    pub rows: usize,
    /// `--deadline-us`, if given.
    pub deadline_us: Option<u64>,
    pub connections: usize,
    pub in_flight: usize,
    pub threads: usize,
    /// None in closed loop (the offered rate is whatever the server takes).
    pub offered: Option<f64>,
    pub achieved: f64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub report: Report,
    pub cpu_s: f64,
    /// Busiest generator thread's CPU over the measured window, percent.
    pub thread_cpu_max_pct: f64,
    /// Why the generator (not the server) limited this run, if it did.
    pub generator_limited: Option<String>,
    pub admin: Option<Delta>,
    /// Search only: whether this run met the SLO.
    pub slo_ok: Option<bool>,
    /// Names of the targets, by index (for the per-target figures of a mix).
    pub target_names: Vec<String>,
    /// The nodes of `--server a,b,c`, by index (empty with one server).
    pub node_names: Vec<String>,
}

impl Summary {
    /// Requests that failed: errors, unanswered, and due but never sent.
    pub fn bad(&self) -> u64 {
        self.report.sent.saturating_sub(self.report.ok) + self.report.unsent
    }
    /// Whether the run fails `--max-error-fraction` (or sent nothing).
    pub fn failed(&self, max_error_fraction: f64) -> bool {
        let due = self.report.sent + self.report.unsent;
        self.report.sent == 0 || self.bad() as f64 > max_error_fraction * due as f64
    }
}

/// The verdict on the generator: late sends or a saturated thread.
///
/// Late sends decide: a glommio executor with a timer due every few µs
/// wakes so often that its thread reads near 100 % CPU while it still keeps
/// the schedule (measured: 400k req/s offered on schedule at "100 %"), so a
/// busy thread alone only earns the `CPU_HIGH_PCT` warning.
///
/// A closed loop has no schedule to be late on: its pace is the slower of
/// the server and the generator, so a generator thread at `CPU_HIGH_PCT`
/// or more decides there.
pub fn generator_verdict(r: &Report, thread_cpu_max_pct: f64, closed: bool) -> Option<String> {
    if closed {
        return (r.sent > 0 && thread_cpu_max_pct >= CPU_HIGH_PCT).then(|| {
            format!(
                "closed loop with a generator thread at {thread_cpu_max_pct:.0}% CPU: it, not the server, set the pace"
            )
        });
    }
    let lag_p99_ms = r.send_lag.value_at_quantile(0.99) as f64 / 1000.0;
    if r.sent == 0 || lag_p99_ms <= SEND_LAG_P99_MS_MAX {
        return None;
    }
    let mut why = format!("send lag p99 {lag_p99_ms:.3} ms > {SEND_LAG_P99_MS_MAX} ms");
    if thread_cpu_max_pct >= CPU_HIGH_PCT {
        why += &format!(" with a generator thread at {thread_cpu_max_pct:.0}% CPU");
    }
    Some(why)
}

/// The generator is late when its own send lag p99 exceeds this.
pub const SEND_LAG_P99_MS_MAX: f64 = 1.0;
/// A generator thread this busy is near its limit even if still on time.
pub const CPU_HIGH_PCT: f64 = 90.0;

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

const QS: [(f64, &str); 5] = [
    (0.5, "p50"),
    (0.9, "p90"),
    (0.95, "p95"),
    (0.99, "p99"),
    (0.999, "p99.9"),
];

pub fn print_table(s: &Summary) {
    let r = &s.report;
    let offered = s
        .offered
        .map_or("closed loop".to_string(), |o| format!("{o:.0} req/s"));
    println!(
        "beast-bench [{}] {} mode, target {} ({} row(s)/request), {} connections x {} in flight on {} thread(s), {:.1}s measured after {:.1}s warm-up",
        s.label, s.mode, s.targets, s.rows, s.connections, s.in_flight, s.threads, s.duration_s, s.warmup_s
    );
    println!("  offered   {offered:>14}");
    println!(
        "  achieved  {:>14.0} req/s ({} ok of {} sent)",
        s.achieved, r.ok, r.sent
    );
    println!("  latency (ms)        p50      p90      p95      p99    p99.9      max     mean");
    let corrected_name = if s.mode == "closed" {
        "closed-loop"
    } else {
        "corrected"
    };
    for (name, h) in [
        (corrected_name, &r.corrected),
        ("uncorrected", &r.uncorrected),
    ] {
        println!(
            "  {:<14} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
            name,
            ms(h, 0.5),
            ms(h, 0.9),
            ms(h, 0.95),
            ms(h, 0.99),
            ms(h, 0.999),
            h.max() as f64 / 1000.0,
            h.mean() / 1000.0
        );
    }
    let errs: Vec<String> = Status::ALL
        .iter()
        .skip(1)
        .filter(|st| r.by_status[**st as usize] > 0)
        .map(|st| format!("{} {}", st.label(), r.by_status[*st as usize]))
        .collect();
    println!(
        "  errors    {}; unanswered {}; unsent {}{}",
        if errs.is_empty() {
            "none".to_string()
        } else {
            errs.join(", ")
        },
        r.unanswered,
        r.unsent,
        if r.unsent > 0 {
            " (due in the measured window, still queued behind a full window at the end)"
        } else {
            ""
        }
    );
    if let Some(d) = s.deadline_us {
        println!(
            "  deadline  {d} us: ok {} = full {} + partial {}; late (ok after deadline + {} ms) {} at the client, {} by the server's total",
            r.ok,
            r.ok - r.partial,
            r.partial,
            LATE_SLACK_US / 1000,
            r.late,
            r.late_server
        );
    } else if r.partial > 0 {
        println!("  partial   {} of the ok answers", r.partial);
    }
    if r.server_gone {
        println!(
            "  SERVER WENT AWAY during the run (connection closed): {} unanswered, {} never sent",
            r.unanswered, r.unsent
        );
    }
    println!(
        "  server    total p50 {} us, p99 {} us; mean queue {:.1} us, mean compute {:.1} us; cached {:.1}% of ok",
        r.server_total.value_at_quantile(0.5),
        r.server_total.value_at_quantile(0.99),
        r.server_queue_us as f64 / r.ok.max(1) as f64,
        r.server_compute_us as f64 / r.ok.max(1) as f64,
        100.0 * r.cached as f64 / r.ok.max(1) as f64
    );
    for (name, t) in s.target_names.iter().zip(&r.per_target) {
        println!(
            "  target    {:<14} ok {:>9} errors {:>6}  p50 {:>8.3}  p99 {:>8.3}  p99.9 {:>8.3} ms",
            name,
            t.ok,
            t.errors,
            ms(&t.corrected, 0.5),
            ms(&t.corrected, 0.99),
            ms(&t.corrected, 0.999)
        );
    }
    for (name, n) in s.node_names.iter().zip(&r.per_node) {
        println!(
            "  node      {:<21} sent {:>9} ok {:>9} ({:>9.1} req/s) errors {:>6} unanswered {:>5}  p50 {:>8.3}  p99 {:>8.3} ms",
            name,
            n.sent,
            n.ok,
            n.ok as f64 / s.duration_s,
            n.errors,
            n.unanswered,
            ms(&n.corrected, 0.5),
            ms(&n.corrected, 0.99),
        );
    }
    if let Some(a) = &s.admin {
        let mb = a.mean_batch.map_or("n/a".into(), |m| {
            format!("{m:.2} ({:.0} batches)", a.batches.unwrap_or(0.0))
        });
        let hr = a.cache_hit_ratio.map_or("n/a".into(), |h| {
            format!(
                "{:.1}% of {:.0} lookups",
                h * 100.0,
                a.cache_lookups.unwrap_or(0.0)
            )
        });
        println!("  admin     mean batch size {mb}; cache hits {hr}");
    }
    println!(
        "  generator send lag (ms) p50 {:.3} p99 {:.3} p99.9 {:.3} max {:.3}; window full {}x; cpu {:.2} s, busiest thread {:.0}%",
        ms(&r.send_lag, 0.5),
        ms(&r.send_lag, 0.99),
        ms(&r.send_lag, 0.999),
        r.send_lag.max() as f64 / 1000.0,
        r.window_full,
        s.cpu_s,
        s.thread_cpu_max_pct
    );
    if r.window_full > 0 && s.mode != "closed" {
        println!("  note      the in-flight window was full {}x: the server (or -c x -k too small for this rate) set the pace", r.window_full);
    }
    if s.generator_limited.is_none() && s.thread_cpu_max_pct >= CPU_HIGH_PCT {
        println!(
            "  !!        generator thread at {:.0}% CPU but on schedule (send lag p99 {:.3} ms): near its limit; add --cpus before raising the rate",
            s.thread_cpu_max_pct,
            ms(&r.send_lag, 0.99)
        );
    }
    if let Some(why) = &s.generator_limited {
        println!("  !!!!!!!!  GENERATOR-LIMITED: {why}. These figures are a bound on the generator, not the server: add --cpus or lower the rate.");
    }
    if let Some(ok) = s.slo_ok {
        println!("  slo       {}", if ok { "met" } else { "MISSED" });
    }
}

/// The `--json` line: field names, order and shapes are the interface that
/// perf/*.sh and tests/bench_smoke.rs read.
#[derive(Serialize)]
struct JsonRun<'a> {
    label: &'a str,
    mode: &'a str,
    target: &'a str,
    rows: usize,
    connections: usize,
    in_flight: usize,
    threads: usize,
    duration_s: f64,
    warmup_s: f64,
    offered_rps: Option<f64>,
    achieved_rps: f64,
    sent: u64,
    ok: u64,
    /// Count per error status, in wire order.
    #[serde(serialize_with = "in_order")]
    errors: Vec<(&'static str, u64)>,
    error_count: u64,
    unanswered: u64,
    unsent: u64,
    cached_fraction: f64,
    latency_ms: Percentiles,
    uncorrected_ms: Percentiles,
    send_lag_ms: Percentiles,
    window_full: u64,
    client_cpu_s: f64,
    client_thread_cpu_max_pct: f64,
    generator_limited: bool,
    generator_limited_reason: Option<&'a str>,
    generator_cpu_high: bool,
    server: JsonServer,
    admin: Option<JsonAdmin>,
    slo_ok: Option<bool>,
    deadline_us: Option<u64>,
    partial: u64,
    late: u64,
    late_server: u64,
    server_gone: bool,
    per_target: Vec<JsonTarget<'a>>,
    /// Only with several nodes (`--server a,b,c`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    per_node: Vec<JsonNode<'a>>,
    /// The lean engine's wakes over the measured window, all threads
    /// together (absent with the glommio engine).
    #[serde(skip_serializing_if = "Option::is_none")]
    generator_wakes: Option<u64>,
}

#[derive(Serialize)]
struct JsonNode<'a> {
    node: &'a str,
    sent: u64,
    ok: u64,
    achieved_rps: f64,
    errors: u64,
    unanswered: u64,
    latency_ms: Percentiles,
}

#[derive(Serialize)]
struct JsonServer {
    total_p50_us: u64,
    total_p99_us: u64,
    mean_queue_us: f64,
    mean_compute_us: f64,
}

#[derive(Serialize)]
struct JsonAdmin {
    mean_batch_size: Option<f64>,
    batches: Option<f64>,
    cache_hit_ratio: Option<f64>,
    cache_lookups: Option<f64>,
}

#[derive(Serialize)]
struct JsonTarget<'a> {
    target: &'a str,
    ok: u64,
    errors: u64,
    latency_ms: Percentiles,
}

/// A latency histogram in milliseconds.
#[derive(Serialize)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p95: f64,
    p99: f64,
    #[serde(rename = "p99.9")]
    p999: f64,
    max: f64,
    mean: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        let [p50, p90, p95, p99, p999] = QS.map(|(q, _)| ms(h, q));
        Percentiles {
            p50,
            p90,
            p95,
            p99,
            p999,
            max: h.max() as f64 / 1000.0,
            mean: h.mean() / 1000.0,
        }
    }
}

fn in_order<S: serde::Serializer>(kv: &[(&'static str, u64)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(kv.iter().map(|(k, v)| (k, v)))
}

/// serde_json's compact output with `", "` and `": "` between items and
/// every float with three decimals (non-finite ones are `null`), as the
/// perf scripts' `"name": number` patterns expect.
struct Spaced;

impl serde_json::ser::Formatter for Spaced {
    fn begin_array_value<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
    fn write_f64<W: ?Sized + Write>(&mut self, w: &mut W, x: f64) -> std::io::Result<()> {
        write!(w, "{x:.3}")
    }
}

pub fn json(s: &Summary) -> String {
    let r = &s.report;
    let per_ok = |x: u64| x as f64 / r.ok.max(1) as f64;
    let run = JsonRun {
        label: &s.label,
        mode: &s.mode,
        target: &s.targets,
        rows: s.rows,
        connections: s.connections,
        in_flight: s.in_flight,
        threads: s.threads,
        duration_s: s.duration_s,
        warmup_s: s.warmup_s,
        offered_rps: s.offered,
        achieved_rps: s.achieved,
        sent: r.sent,
        ok: r.ok,
        errors: Status::ALL
            .iter()
            .skip(1)
            .map(|st| (st.label(), r.by_status[*st as usize]))
            .collect(),
        error_count: r.errors(),
        unanswered: r.unanswered,
        unsent: r.unsent,
        cached_fraction: per_ok(r.cached),
        latency_ms: Percentiles::of(&r.corrected),
        uncorrected_ms: Percentiles::of(&r.uncorrected),
        send_lag_ms: Percentiles::of(&r.send_lag),
        window_full: r.window_full,
        client_cpu_s: s.cpu_s,
        client_thread_cpu_max_pct: s.thread_cpu_max_pct,
        generator_limited: s.generator_limited.is_some(),
        generator_limited_reason: s.generator_limited.as_deref(),
        generator_cpu_high: s.thread_cpu_max_pct >= CPU_HIGH_PCT,
        server: JsonServer {
            total_p50_us: r.server_total.value_at_quantile(0.5),
            total_p99_us: r.server_total.value_at_quantile(0.99),
            mean_queue_us: per_ok(r.server_queue_us),
            mean_compute_us: per_ok(r.server_compute_us),
        },
        admin: s.admin.as_ref().map(|a| JsonAdmin {
            mean_batch_size: a.mean_batch,
            batches: a.batches,
            cache_hit_ratio: a.cache_hit_ratio,
            cache_lookups: a.cache_lookups,
        }),
        slo_ok: s.slo_ok,
        deadline_us: s.deadline_us,
        partial: r.partial,
        late: r.late,
        late_server: r.late_server,
        server_gone: r.server_gone,
        per_target: s
            .target_names
            .iter()
            .zip(&r.per_target)
            .map(|(n, t)| JsonTarget {
                target: n,
                ok: t.ok,
                errors: t.errors,
                latency_ms: Percentiles::of(&t.corrected),
            })
            .collect(),
        per_node: s
            .node_names
            .iter()
            .zip(&r.per_node)
            .map(|(n, t)| JsonNode {
                node: n,
                sent: t.sent,
                ok: t.ok,
                achieved_rps: t.ok as f64 / s.duration_s,
                errors: t.errors,
                unanswered: t.unanswered,
                latency_ms: Percentiles::of(&t.corrected),
            })
            .collect(),
        generator_wakes: r.wakes,
    };
    spaced(&run)
}

/// The last line of `--search --json`.
#[derive(Serialize)]
struct SearchLine {
    search_result: SearchResult,
}

#[derive(Serialize)]
struct SearchResult {
    /// Rounded to 0.1 req/s.
    best_rps: Option<f64>,
    slo_p95_ms: f64,
    lo: f64,
    hi: f64,
    trials: usize,
    generator_limited_trials: bool,
}

pub fn search_json(
    best: Option<f64>,
    slo_p95_ms: f64,
    (lo, hi): (f64, f64),
    trials: usize,
    generator_limited_trials: bool,
) -> String {
    spaced(&SearchLine {
        search_result: SearchResult {
            best_rps: best.map(|b| (b * 10.0).round() / 10.0),
            slo_p95_ms,
            lo,
            hi,
            trials,
            generator_limited_trials,
        },
    })
}

fn spaced<T: Serialize>(v: &T) -> String {
    let mut out = Vec::new();
    v.serialize(&mut serde_json::Serializer::with_formatter(
        &mut out, Spaced,
    ))
    .expect("serializing to memory cannot fail");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

pub const CSV_HEADER: &str = "label,mode,target,rows,connections,in_flight,threads,offered_rps,achieved_rps,sent,ok,errors,unanswered,unsent,p50_ms,p90_ms,p95_ms,p99_ms,p999_ms,max_ms,uncorrected_p50_ms,uncorrected_p99_ms,send_lag_p99_ms,send_lag_max_ms,window_full,client_cpu_s,client_thread_cpu_max_pct,generator_limited,server_total_p50_us,server_total_p99_us,server_mean_queue_us,server_mean_compute_us,cached_fraction,admin_mean_batch_size,admin_cache_hit_ratio,slo_ok,deadline_us,partial,late,late_server,server_gone";

pub fn csv(s: &Summary) -> String {
    let r = &s.report;
    let f = |x: f64| format!("{x:.3}");
    let opt = |x: Option<f64>| x.map_or(String::new(), f);
    // Target mixes contain commas: quote the field (RFC 4180: "" inside).
    let q = |x: &str| format!("\"{}\"", x.replace('"', "\"\""));
    let fields = [
        q(&s.label),
        s.mode.clone(),
        q(&s.targets),
        s.rows.to_string(),
        s.connections.to_string(),
        s.in_flight.to_string(),
        s.threads.to_string(),
        opt(s.offered),
        f(s.achieved),
        r.sent.to_string(),
        r.ok.to_string(),
        r.errors().to_string(),
        r.unanswered.to_string(),
        r.unsent.to_string(),
        f(ms(&r.corrected, 0.5)),
        f(ms(&r.corrected, 0.9)),
        f(ms(&r.corrected, 0.95)),
        f(ms(&r.corrected, 0.99)),
        f(ms(&r.corrected, 0.999)),
        f(r.corrected.max() as f64 / 1000.0),
        f(ms(&r.uncorrected, 0.5)),
        f(ms(&r.uncorrected, 0.99)),
        f(ms(&r.send_lag, 0.99)),
        f(r.send_lag.max() as f64 / 1000.0),
        r.window_full.to_string(),
        f(s.cpu_s),
        f(s.thread_cpu_max_pct),
        s.generator_limited.is_some().to_string(),
        r.server_total.value_at_quantile(0.5).to_string(),
        r.server_total.value_at_quantile(0.99).to_string(),
        f(r.server_queue_us as f64 / r.ok.max(1) as f64),
        f(r.server_compute_us as f64 / r.ok.max(1) as f64),
        f(r.cached as f64 / r.ok.max(1) as f64),
        opt(s.admin.as_ref().and_then(|a| a.mean_batch)),
        opt(s.admin.as_ref().and_then(|a| a.cache_hit_ratio)),
        s.slo_ok.map_or(String::new(), |b| b.to_string()),
        s.deadline_us.map_or(String::new(), |d| d.to_string()),
        r.partial.to_string(),
        r.late.to_string(),
        r.late_server.to_string(),
        r.server_gone.to_string(),
    ];
    fields.join(",")
}

/// The classic HdrHistogram percentile distribution (what Java's
/// `outputPercentileDistribution` and wrk2 print, and what the online
/// plotters read), values in milliseconds from a µs histogram.
pub fn write_hgrm(w: &mut dyn Write, h: &Histogram<u64>) -> std::io::Result<()> {
    let scale = 1000.0;
    writeln!(
        w,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    )?;
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let value = h.highest_equivalent(v.value_iterated_to()) as f64 / scale;
        if q < 1.0 {
            writeln!(
                w,
                "{:>12.3} {:>2.12} {:>10} {:>14.2}",
                value,
                q,
                total,
                1.0 / (1.0 - q)
            )?;
        } else {
            writeln!(w, "{:>12.3} {:>2.12} {:>10}", value, q, total)?;
        }
    }
    // Sub-buckets per bucket: the power of two covering 2 × 10^sigfig.
    let sub_buckets = (2 * 10u64.pow(h.sigfig() as u32)).next_power_of_two();
    writeln!(
        w,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        h.mean() / scale,
        h.stdev() / scale
    )?;
    writeln!(
        w,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        h.max() as f64 / scale,
        h.len()
    )?;
    writeln!(
        w,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.buckets(),
        sub_buckets
    )?;
    Ok(())
}

/// `--hgrm DIR`: DIR/<label>-corrected.hgrm and -uncorrected.hgrm.
pub fn write_hgrm_files(dir: &Path, s: &Summary) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("--hgrm {}: {e}", dir.display()))?;
    let stem: String = s
        .label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let rate = s.offered.map_or("closed".into(), |o| format!("{o:.0}rps"));
    for (kind, h) in [
        ("corrected", &s.report.corrected),
        ("uncorrected", &s.report.uncorrected),
    ] {
        let path = dir.join(format!("{stem}-{rate}-{kind}.hgrm"));
        let mut f =
            std::fs::File::create(&path).map_err(|e| format!("--hgrm {}: {e}", path.display()))?;
        write_hgrm(&mut f, h).map_err(|e| format!("--hgrm {}: {e}", path.display()))?;
    }
    Ok(())
}

/// `--plot FILE.svg`: p50/p90/p99/p99.9 (ms, log scale) against offered
/// rate, and below it achieved against offered rate with the y = x line.
pub fn plot(path: &Path, runs: &[&Summary], title: &str) -> Result<(), String> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| format!("--plot {}: {e}", path.display());
    let mut pts: Vec<&Summary> = runs
        .iter()
        .copied()
        .filter(|s| s.offered.is_some() && s.report.ok > 0)
        .collect();
    if pts.is_empty() {
        return Err(format!(
            "--plot {}: no open-loop run with answers to plot",
            path.display()
        ));
    }
    pts.sort_by(|a, b| {
        a.offered
            .partial_cmp(&b.offered)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let xmax = pts
        .iter()
        .map(|s| s.offered.unwrap_or(0.0).max(s.achieved))
        .fold(1.0, f64::max)
        * 1.05;
    let series: [(f64, &str, RGBColor); 4] = [
        (0.5, "p50", BLUE),
        (0.9, "p90", GREEN),
        (0.99, "p99", RGBColor(230, 140, 0)),
        (0.999, "p99.9", RED),
    ];
    let lat =
        |s: &Summary, q: f64| (s.report.corrected.value_at_quantile(q) as f64 / 1000.0).max(0.001);
    let ymax = pts.iter().map(|s| lat(s, 0.999)).fold(0.01, f64::max) * 2.0;
    let ymin = pts
        .iter()
        .map(|s| lat(s, 0.5))
        .fold(f64::MAX, f64::min)
        .max(0.001)
        / 2.0;
    let root = SVGBackend::new(path, (900, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(560);
    let mut c = ChartBuilder::on(&top)
        .caption(
            format!("{title}: latency (CO-corrected) vs offered rate"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, (ymin..ymax).log_scale())
        .map_err(|e| err(&e))?;
    let whole = |x: &f64| format!("{x:.0}");
    c.configure_mesh()
        .x_desc("offered rate (req/s)")
        .x_label_formatter(&whole)
        .y_desc("latency (ms)")
        .y_label_formatter(&|y: &f64| format!("{y}"))
        .draw()
        .map_err(|e| err(&e))?;
    for (q, name, color) in series {
        let data: Vec<(f64, f64)> = pts
            .iter()
            .map(|s| (s.offered.unwrap_or(0.0), lat(s, q)))
            .collect();
        c.draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        c.draw_series(data.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(&e))?;
    let mut a = ChartBuilder::on(&bottom)
        .caption("achieved vs offered rate (req/s)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, 0f64..xmax)
        .map_err(|e| err(&e))?;
    a.configure_mesh()
        .x_desc("offered rate (req/s)")
        .x_label_formatter(&whole)
        .y_desc("achieved (req/s)")
        .y_label_formatter(&whole)
        .draw()
        .map_err(|e| err(&e))?;
    a.draw_series(LineSeries::new(
        vec![(0.0, 0.0), (xmax, xmax)],
        BLACK.mix(0.3),
    ))
    .map_err(|e| err(&e))?
    .label("achieved = offered")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.3)));
    let data: Vec<(f64, f64)> = pts
        .iter()
        .map(|s| (s.offered.unwrap_or(0.0), s.achieved))
        .collect();
    a.draw_series(LineSeries::new(data.clone(), BLUE.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("achieved")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    a.draw_series(data.into_iter().map(|p| Circle::new(p, 3, BLUE.filled())))
        .map_err(|e| err(&e))?;
    a.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hgrm_writer_matches_the_classic_format() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for v in 1..=1000u64 {
            h.record(v * 10).unwrap(); // 10 µs .. 10 ms
        }
        let mut out = Vec::new();
        write_hgrm(&mut out, &h).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "       Value     Percentile TotalCount 1/(1-Percentile)"
        );
        assert_eq!(lines[1], "");
        // First data row: the smallest value (0.010 ms) at percentile 0.
        let first: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(first, ["0.010", "0.000000000000", "1", "1.00"]);
        // Data rows: 4 columns, cumulative count never falls, last at 1.0 with 3 columns.
        let rows: Vec<Vec<&str>> = lines[2..]
            .iter()
            .take_while(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().collect())
            .collect();
        let mut prev = 0u64;
        for r in &rows[..rows.len() - 1] {
            assert_eq!(r.len(), 4, "{r:?}");
            let c: u64 = r[2].parse().unwrap();
            assert!(c >= prev);
            prev = c;
        }
        let last = rows.last().unwrap();
        assert_eq!(
            (last.len(), last[1], last[2]),
            (3, "1.000000000000", "1000")
        );
        assert!((last[0].parse::<f64>().unwrap() - 10.0).abs() < 0.01);
        let footer: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with("#["))
            .collect();
        assert_eq!(footer.len(), 3);
        assert!(footer[0].starts_with("#[Mean    =") && footer[0].contains("StdDeviation   ="));
        assert!(footer[1].contains("Total count    =         1000]"));
        assert!(footer[2].contains("SubBuckets     =         2048]"));
    }

    #[test]
    fn generator_verdict_follows_send_lag() {
        let mut r = Report::new();
        r.sent = 1000;
        for _ in 0..1000 {
            r.send_lag.record(50).unwrap(); // 50 µs: on time
        }
        assert_eq!(
            generator_verdict(&r, 100.0, false),
            None,
            "busy but on time"
        );
        for _ in 0..100 {
            r.send_lag.record(5000).unwrap(); // 9% of sends 5 ms late
        }
        let why = generator_verdict(&r, 95.0, false).expect("late");
        assert!(
            why.starts_with("send lag p99 5.") && why.contains("95% CPU"),
            "{why}"
        );
        assert!(!generator_verdict(&r, 20.0, false).unwrap().contains("CPU"));
        assert_eq!(
            generator_verdict(&Report::new(), 100.0, false),
            None,
            "nothing sent"
        );
    }

    #[test]
    fn closed_loop_verdict_follows_the_generator_cpu() {
        // A closed loop sends when a slot frees: its send lag is always 0,
        // so a saturated generator thread is what says it set the pace.
        let mut r = Report::new();
        r.sent = 1000;
        for _ in 0..1000 {
            r.send_lag.record(0).unwrap();
        }
        let why = generator_verdict(&r, 96.0, true).expect("a busy closed-loop generator");
        assert!(why.contains("96% CPU"), "{why}");
        assert_eq!(generator_verdict(&r, 60.0, true), None, "room left");
        assert_eq!(
            generator_verdict(&Report::new(), 99.0, true),
            None,
            "nothing sent"
        );
        // The open loop keeps its rule: busy but on time is no verdict.
        assert_eq!(generator_verdict(&r, 96.0, false), None);
    }

    /// A run with every optional part filled in (admin deltas, a mix of
    /// targets, a generator verdict, a non-finite figure).
    fn full_summary() -> Summary {
        let mut r = Report::new();
        r.sent = 1000;
        r.ok = 990;
        r.cached = 99;
        r.by_status[2] = 4;
        r.by_status[5] = 1;
        r.unanswered = 5;
        r.unsent = 2;
        r.window_full = 7;
        r.partial = 3;
        r.late = 2;
        r.late_server = 1;
        r.server_queue_us = 12_345;
        r.server_compute_us = 67_890;
        for v in [1500, 2500, 12_000] {
            r.corrected.record(v).unwrap();
            r.uncorrected.record(v / 2).unwrap();
            r.send_lag.record(v / 100).unwrap();
            r.server_total.record(v / 3).unwrap();
        }
        let mut t = |ok, errors, v| {
            let mut corrected = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            corrected.record(v).unwrap();
            r.per_target.push(super::super::load::TargetStats {
                corrected,
                ok,
                errors,
            });
        };
        t(600, 3, 1000);
        t(390, 2, 3000);
        Summary {
            label: "search 3".into(),
            mode: "open/uniform".into(),
            targets: "a:3,\"b\\c\":1".into(),
            rows: 2,
            deadline_us: None,
            connections: 8,
            in_flight: 64,
            threads: 2,
            offered: Some(1234.5678),
            achieved: f64::NAN,
            duration_s: 2.0,
            warmup_s: 0.25,
            report: r,
            cpu_s: 0.123_456,
            thread_cpu_max_pct: 97.5,
            generator_limited: Some("send lag p99 \"9\" ms".into()),
            admin: Some(Delta {
                mean_batch: Some(3.5),
                batches: Some(100.0),
                cache_hit_ratio: None,
                cache_lookups: Some(0.0),
            }),
            slo_ok: Some(false),
            target_names: vec!["a".into(), "b\\c".into()],
            node_names: Vec::new(),
        }
    }

    /// The `--json` line byte for byte: perf/*.sh read fields with sed on
    /// `"name": number` and the figures keep three decimals.
    #[test]
    fn json_line_is_stable_byte_for_byte() {
        let want = r#"{"label": "search 3", "mode": "open/uniform", "target": "a:3,\"b\\c\":1", "rows": 2, "connections": 8, "in_flight": 64, "threads": 2, "duration_s": 2.000, "warmup_s": 0.250, "offered_rps": 1234.568, "achieved_rps": null, "sent": 1000, "ok": 990, "errors": {"bad_request": 0, "not_found": 4, "overloaded": 0, "deadline_exceeded": 0, "internal": 1}, "error_count": 5, "unanswered": 5, "unsent": 2, "cached_fraction": 0.100, "latency_ms": {"p50": 2.501, "p90": 12.007, "p95": 12.007, "p99": 12.007, "p99.9": 12.007, "max": 12.007, "mean": 5.335}, "uncorrected_ms": {"p50": 1.250, "p90": 6.003, "p95": 6.003, "p99": 6.003, "p99.9": 6.003, "max": 6.003, "mean": 2.667}, "send_lag_ms": {"p50": 0.025, "p90": 0.120, "p95": 0.120, "p99": 0.120, "p99.9": 0.120, "max": 0.120, "mean": 0.053}, "window_full": 7, "client_cpu_s": 0.123, "client_thread_cpu_max_pct": 97.500, "generator_limited": true, "generator_limited_reason": "send lag p99 \"9\" ms", "generator_cpu_high": true, "server": {"total_p50_us": 833, "total_p99_us": 4001, "mean_queue_us": 12.470, "mean_compute_us": 68.576}, "admin": {"mean_batch_size": 3.500, "batches": 100.000, "cache_hit_ratio": null, "cache_lookups": 0.000}, "slo_ok": false, "deadline_us": null, "partial": 3, "late": 2, "late_server": 1, "server_gone": false, "per_target": [{"target": "a", "ok": 600, "errors": 3, "latency_ms": {"p50": 1.000, "p90": 1.000, "p95": 1.000, "p99": 1.000, "p99.9": 1.000, "max": 1.000, "mean": 1.000}}, {"target": "b\\c", "ok": 390, "errors": 2, "latency_ms": {"p50": 3.001, "p90": 3.001, "p95": 3.001, "p99": 3.001, "p99.9": 3.001, "max": 3.001, "mean": 3.001}}]}"#;
        assert_eq!(json(&full_summary()), want);
    }

    #[test]
    fn search_result_line() {
        assert_eq!(
            search_json(Some(1234.56), 10.0, (100.0, 5000.0), 7, false),
            r#"{"search_result": {"best_rps": 1234.600, "slo_p95_ms": 10.000, "lo": 100.000, "hi": 5000.000, "trials": 7, "generator_limited_trials": false}}"#
        );
        let none: serde_json::Value =
            serde_json::from_str(&search_json(None, 2.5, (1.0, 2.0), 3, true)).unwrap();
        assert!(none["search_result"]["best_rps"].is_null());
        assert_eq!(none["search_result"]["generator_limited_trials"], true);
    }

    #[test]
    fn json_and_csv_lines_are_well_formed() {
        let mut r = Report::new();
        r.sent = 10;
        r.ok = 9;
        r.by_status[2] = 1;
        r.partial = 3;
        r.late = 2;
        r.corrected.record(1500).unwrap();
        let s = Summary {
            label: "sweep 1/2".into(),
            mode: "open/poisson".into(),
            targets: "a:3,\"b\":1".into(),
            rows: 1,
            deadline_us: Some(20_000),
            connections: 2,
            in_flight: 4,
            threads: 1,
            offered: Some(1000.0),
            achieved: 900.0,
            duration_s: 1.0,
            warmup_s: 0.5,
            report: r,
            cpu_s: 0.1,
            thread_cpu_max_pct: 10.0,
            generator_limited: None,
            admin: None,
            slo_ok: Some(true),
            target_names: vec!["a".into(), "b".into()],
            node_names: Vec::new(),
        };
        let j: serde_json::Value = serde_json::from_str(&json(&s)).unwrap();
        assert_eq!(j["offered_rps"], 1000.0);
        assert_eq!(j["target"], "a:3,\"b\":1");
        assert_eq!(j["errors"]["not_found"], 1);
        assert_eq!(j["latency_ms"]["p50"], 1.5);
        assert!(j["admin"].is_null());
        assert_eq!(j["deadline_us"], 20000);
        assert_eq!(j["partial"], 3);
        assert_eq!(j["late"], 2);
        assert_eq!(j["per_target"], serde_json::json!([]));
        // CSV: as many fields as the header, quotes respected.
        let line = csv(&s);
        let (mut fields, mut quoted) = (1, false);
        for c in line.chars() {
            match c {
                '"' => quoted = !quoted,
                ',' if !quoted => fields += 1,
                _ => {}
            }
        }
        assert_eq!(fields, CSV_HEADER.split(',').count(), "{line}");
    }
}
