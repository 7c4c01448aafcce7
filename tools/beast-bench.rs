//! beast-bench: the load generator for beast.
//!
//! Open loop (default): each connection sends on a schedule (uniform or
//! Poisson arrivals, seeded; or a recorded trace) with at most `--in-flight`
//! outstanding. Latency is measured from each request's *intended* send
//! time, so a server (or client) that falls behind is charged for the
//! queueing it causes (coordinated-omission correction, as wrk2 does); the
//! uncorrected figure (from the actual send) is printed beside it. The
//! generator reports its own lateness and CPU and says loudly when it, not
//! the server, was the limit. Closed loop (`--closed`) keeps K in flight per
//! connection instead. `--sweep` and `--search` run many rates. The manual
//! is docs/BENCH.md.
//!
//! Modules: `dist` (PRNG, arrivals, Zipf, target mix), `inputs` (rows,
//! traces), `lean` (the epoll engine, the default against one server),
//! `load` (the glommio engine, and the figures both keep), `output` (table, JSON, CSV, hgrm,
//! plot), `search` (bisection), `admin` (Prometheus scrape).

#[path = "bench/admin.rs"]
mod admin;
#[path = "bench/dist.rs"]
mod dist;
#[path = "bench/frames.rs"]
mod frames;
#[path = "bench/inputs.rs"]
mod inputs;
#[path = "bench/lean.rs"]
mod lean;
#[path = "bench/load.rs"]
mod load;
#[path = "bench/output.rs"]
mod output;
#[path = "bench/preflight.rs"]
mod preflight;
#[path = "bench/search.rs"]
mod search;
#[path = "bench/watchdog.rs"]
mod watchdog;

use clap::Parser;
use dist::{Arrivals, TargetSpec, Zipf};
use inputs::{Pool, TraceEntry};
use load::{Mode, Plan, RowDist};
use mimalloc::MiMalloc;
use output::Summary;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[derive(Parser, Clone, Debug)]
#[command(
    name = "beast-bench",
    about = "Load generator for beast: open loop (coordinated-omission corrected) or closed loop; sweeps, SLO search, traces"
)]
struct Args {
    /// Server address; several, comma-separated (a,b,c), spread the load
    /// over those nodes by the cluster client's rendezvous rule, with
    /// per-node and total figures.
    #[arg(long, default_value = "127.0.0.1:7878")]
    server: String,
    /// Target(s): name[:weight[:width]],... e.g. "bench_ens:3,bench_a:1".
    #[arg(long, default_value = "bench_ens")]
    target: String,
    /// Default input width of the targets [default: 256, or the input file's width].
    #[arg(long)]
    width: Option<usize>,
    /// Rows per request.
    #[arg(long, default_value_t = 1)]
    rows: usize,
    /// Offered rate, requests per second (all connections together).
    #[arg(long, default_value_t = 10_000.0)]
    rate: f64,
    /// Arrival process of the open loop: uniform or poisson.
    #[arg(long, default_value = "uniform")]
    arrivals: String,
    /// Seed of every random choice (arrivals, rows, targets, input values).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Closed loop: each connection keeps --in-flight requests outstanding (--rate unused).
    #[arg(long)]
    closed: bool,
    /// Connections.
    #[arg(long, short = 'c', default_value_t = 32)]
    connections: usize,
    /// Requests in flight per connection, at most.
    #[arg(long, short = 'k', default_value_t = 16)]
    in_flight: usize,
    /// Measured seconds (per rate for --sweep/--search).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring (excluded from the results).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// CPUs for the generator's threads (one thread pinned to each), e.g. "1" or "1,3".
    #[arg(long, default_value = "")]
    cpus: String,
    /// Generator threads, spread round-robin over --cpus [default: one per CPU in --cpus].
    #[arg(long)]
    threads: Option<usize>,
    /// The I/O engine: `lean` (one epoll loop per thread, batched writes;
    /// against one server) or `glommio` (a sender and a receiver task per
    /// connection on a glommio executor; what several servers use).
    #[arg(long, default_value = "lean", value_parser = ["lean", "glommio"])]
    engine: String,
    /// Encode every request as it is sent, instead of copying a frame encoded once per
    /// (target, input) before the run and patching its id (the default when all fit in 64 MiB).
    #[arg(long)]
    encode_each: bool,
    /// Distinct inputs to draw from [default: 4096, or all rows of the input file].
    #[arg(long)]
    distinct: Option<usize>,
    /// Draw inputs Zipf(S)-distributed over the distinct rows (rank 1 most popular) instead of uniformly.
    #[arg(long, value_name = "S")]
    zipf: Option<f64>,
    /// Rows from a file (.csv with an optional header row, or 2-D .npy) instead of random values.
    #[arg(long, value_name = "FILE")]
    input_file: Option<PathBuf>,
    /// Drop the input file's last column (e.g. a label).
    #[arg(long)]
    drop_last_column: bool,
    /// Replay a trace (CSV offset_us,target,row_index) with its timing.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Write the run's schedule as a trace (CSV offset_us,target,row_index).
    #[arg(long, value_name = "FILE")]
    record_trace: Option<PathBuf>,
    /// Send inputs as FP16.
    #[arg(long)]
    f16: bool,
    /// Ask the server to bypass its cache.
    #[arg(long)]
    no_cache: bool,
    /// Give every request this budget (µs from its arrival at the server):
    /// the report then counts partial answers and late ones (OK later than
    /// the budget + 1 ms after the send) apart.
    #[arg(long, value_name = "US")]
    deadline_us: Option<u64>,
    /// Fail (exit 1) when more than this fraction of requests erred, went unanswered or was never sent (or none was sent).
    #[arg(long, default_value_t = 0.001)]
    max_error_fraction: f64,
    /// Run a list of offered rates, e.g. "5000,10000,20000".
    #[arg(long, value_name = "R1,R2,...")]
    sweep: Option<String>,
    /// Find the highest offered rate meeting --slo-p95-ms by bisection between LO and HI.
    #[arg(long, value_name = "LO:HI")]
    search: Option<String>,
    /// The SLO for --search: corrected p95 latency in ms.
    #[arg(long, value_name = "MS")]
    slo_p95_ms: Option<f64>,
    /// Most bisection steps of --search after its two end points.
    #[arg(long, default_value_t = 8)]
    search_steps: usize,
    /// Stop --search when HI/LO - 1 is at most this.
    #[arg(long, default_value_t = 0.02)]
    search_tolerance: f64,
    /// Print one JSON object per run instead of the table.
    #[arg(long)]
    json: bool,
    /// Print CSV rows (header once) instead of the table.
    #[arg(long)]
    csv: bool,
    /// Write HdrHistogram percentile distributions (.hgrm) of each run into DIR.
    #[arg(long, value_name = "DIR")]
    hgrm: Option<PathBuf>,
    /// Draw latency percentiles against offered rate (for --sweep/--search) into an SVG.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Admin address of the server (ADDR:PORT): scrape /metrics before and after each run.
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,
}

/// Limits on the flags, so that a typo fails with a message rather than an
/// allocation failure: slots per connection, connections, distinct inputs
/// (a Zipf table is 8 bytes each; rows travel as u32 in traces), and the
/// input bytes of one request.
const IN_FLIGHT_MAX: usize = 1 << 16;
const CONNECTIONS_MAX: usize = 1 << 14;
const DISTINCT_MAX: usize = 1 << 26;
const REQUEST_BYTES_MAX: usize = 4 << 20;

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("beast-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The parts of a plan that do not depend on the offered rate.
fn base_plan(args: &Args) -> Result<Plan, String> {
    let arrivals = Arrivals::parse(&args.arrivals)?;
    if args.rows == 0 {
        return Err("--rows must be at least 1".into());
    }
    if args.in_flight == 0 || args.in_flight > IN_FLIGHT_MAX {
        return Err(format!("--in-flight must be within 1..={IN_FLIGHT_MAX}"));
    }
    if args.connections > CONNECTIONS_MAX {
        return Err(format!("--connections must be at most {CONNECTIONS_MAX}"));
    }
    // Written so that NaN fails too.
    let positive = |x: f64| x > 0.0 && x.is_finite();
    if !positive(args.duration) || !(positive(args.warmup) || args.warmup == 0.0) {
        return Err("--duration must be > 0 and --warmup >= 0 seconds".into());
    }
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        return Err(format!("--rate must be > 0, got {}", args.rate));
    }
    if args.deadline_us == Some(0) {
        return Err("--deadline-us must be at least 1".into());
    }
    if !(0.0..=1.0).contains(&args.max_error_fraction) {
        return Err("--max-error-fraction must be within 0..=1".into());
    }
    if args.drop_last_column && args.input_file.is_none() {
        return Err("--drop-last-column needs --input-file".into());
    }
    let cpus = frames::generator_threads(&args.cpus, args.threads)?;
    if args.connections < cpus.len() {
        return Err(format!(
            "--connections ({}) must be at least the number of generator threads ({})",
            args.connections,
            cpus.len()
        ));
    }
    let mut addrs = Vec::new();
    for one in args.server.split(',') {
        let addr = std::net::ToSocketAddrs::to_socket_addrs(one.trim())
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| format!("--server: cannot resolve '{one}'"))?;
        if addrs.contains(&addr) {
            return Err(format!("--server: {addr} is given twice"));
        }
        addrs.push(addr);
    }
    if addrs.len() > beast::client::NODES_MAX {
        return Err(format!(
            "--server: at most {} nodes",
            beast::client::NODES_MAX
        ));
    }

    // Inputs: a file, or seeded random rows per width.
    let file = match &args.input_file {
        Some(p) => Some(inputs::read_rows(p, args.drop_last_column)?),
        None => None,
    };
    let default_width = match (&file, args.width) {
        (Some((_, cols, _)), Some(w)) if w != *cols => {
            return Err(format!(
                "--width {w} differs from the input file's {cols} columns"
            ))
        }
        (Some((_, cols, _)), _) => *cols,
        (None, w) => w.unwrap_or(256),
    };
    if default_width == 0 {
        return Err("--width must be at least 1".into());
    }
    let mut targets = dist::parse_targets(&args.target, default_width)?;
    // The server refuses frames over its limit (4 MiB by default); say so here.
    if let Some(t) = targets
        .iter()
        .find(|t| args.rows.saturating_mul(t.width).saturating_mul(4) > REQUEST_BYTES_MAX)
    {
        return Err(format!(
            "--rows {} x width {} of '{}' makes requests over {} MiB, the server's default frame limit",
            args.rows,
            t.width,
            t.name,
            REQUEST_BYTES_MAX >> 20
        ));
    }
    let mut trace_entries = None;
    if let Some(p) = &args.trace {
        let entries = inputs::read_trace(p)?;
        // The trace names its targets; widths come from --target where it names them too.
        let mut names: Vec<String> = Vec::new();
        for e in &entries {
            if !names.contains(&e.target) {
                names.push(e.target.clone());
            }
        }
        targets = names
            .iter()
            .map(|n| TargetSpec {
                name: n.clone(),
                weight: 1.0,
                width: targets
                    .iter()
                    .find(|t| &t.name == n)
                    .map_or(default_width, |t| t.width),
            })
            .collect();
        trace_entries = Some(entries);
    }
    let (pools, distinct): (Vec<Arc<Pool>>, usize) = match file {
        Some((nrows, cols, data)) => {
            if let Some(t) = targets.iter().find(|t| t.width != cols) {
                return Err(format!(
                    "--target {}: width {} but --input-file rows have {cols} columns",
                    t.name, t.width
                ));
            }
            let groups = nrows / args.rows;
            if groups == 0 {
                return Err(format!(
                    "--input-file has {nrows} rows, fewer than --rows {}",
                    args.rows
                ));
            }
            let n = args.distinct.map_or(groups, |d| d.min(groups));
            let len = args.rows * cols;
            let pool = Arc::new(Pool::Stored {
                data: data[..groups * len].to_vec(),
                len,
                n: groups,
            });
            (targets.iter().map(|_| pool.clone()).collect(), n)
        }
        None => {
            let n = args.distinct.unwrap_or(4096);
            if n == 0 {
                return Err("--distinct must be at least 1".into());
            }
            let mut by_width: Vec<(usize, Arc<Pool>)> = Vec::new();
            let pools = targets
                .iter()
                .map(|t| match by_width.iter().find(|(w, _)| *w == t.width) {
                    Some((_, p)) => p.clone(),
                    None => {
                        let p = Arc::new(Pool::random(
                            args.seed ^ (t.width as u64) << 32,
                            n,
                            args.rows * t.width,
                        ));
                        by_width.push((t.width, p.clone()));
                        p
                    }
                })
                .collect();
            (pools, n)
        }
    };
    if distinct > DISTINCT_MAX {
        return Err(format!("--distinct must be at most {DISTINCT_MAX}"));
    }
    let row_dist = match args.zipf {
        Some(s) => RowDist::Zipf(Arc::new(Zipf::new(distinct, s)?)),
        None => RowDist::Uniform(distinct),
    };
    let mut duration_s = args.duration;
    let mode = match trace_entries {
        Some(entries) => {
            if args.closed || args.sweep.is_some() || args.search.is_some() {
                return Err("--trace cannot be combined with --closed, --sweep or --search".into());
            }
            let mut per_conn = vec![Vec::new(); args.connections];
            for (j, e) in entries.iter().enumerate() {
                let t = targets.iter().position(|t| t.name == e.target).unwrap_or(0) as u32;
                if e.row >= pools[t as usize].len() || e.row > u32::MAX as usize {
                    return Err(format!(
                        "--trace: row_index {} is beyond the {} distinct inputs",
                        e.row,
                        pools[t as usize].len()
                    ));
                }
                per_conn[j % args.connections].push((e.offset_us, t, e.row as u32));
            }
            let last_s = entries.last().map_or(0.0, |e| e.offset_us as f64 / 1e6);
            duration_s = last_s - args.warmup;
            if duration_s <= 0.0 {
                return Err(format!("--trace spans {last_s:.3} s, not more than --warmup {} s: nothing would be measured (try --warmup 0)", args.warmup));
            }
            Mode::Trace(per_conn)
        }
        None if args.closed => Mode::Closed,
        None => Mode::Open {
            rate: args.rate,
            arrivals,
        },
    };
    Ok(Plan {
        route: load::route_table(&addrs, &targets, &pools, args.f16),
        addrs,
        targets,
        pools,
        rows: args.rows,
        f16: args.f16,
        no_cache: args.no_cache,
        deadline_us: args.deadline_us,
        connections: args.connections,
        in_flight: args.in_flight,
        warmup_s: args.warmup,
        duration_s,
        seed: args.seed,
        row_dist,
        mode,
        record_trace: args.record_trace.is_some(),
        cpus,
        prebuilt: !args.encode_each,
    })
}

fn run(args: &Args) -> Result<ExitCode, String> {
    if args.json && args.csv {
        return Err("choose one of --json and --csv".into());
    }
    if args.sweep.is_some() && args.search.is_some() {
        return Err("choose one of --sweep and --search".into());
    }
    if args.closed && (args.sweep.is_some() || args.search.is_some()) {
        return Err(
            "--closed has no offered rate: it cannot be combined with --sweep or --search".into(),
        );
    }
    if args.record_trace.is_some() && (args.sweep.is_some() || args.search.is_some()) {
        return Err("--record-trace records one run: not with --sweep or --search".into());
    }
    let search = match &args.search {
        Some(s) => {
            let range = search::parse_range(s)?;
            let slo = args.slo_p95_ms.ok_or("--search needs --slo-p95-ms")?;
            if !(slo > 0.0 && slo.is_finite()) {
                return Err("--slo-p95-ms must be > 0".into());
            }
            Some((range, slo))
        }
        None => None,
    };
    let sweep = args.sweep.as_deref().map(search::parse_rates).transpose()?;
    let base = base_plan(args)?;
    let targets: Vec<(String, usize)> = base
        .targets
        .iter()
        .map(|t| (t.name.clone(), t.width))
        .collect();
    let mut problems = Vec::new();
    for addr in &base.addrs {
        let name = if base.addrs.len() > 1 {
            addr.to_string()
        } else {
            args.server.clone()
        };
        problems.extend(preflight::check(*addr, &targets, &name));
    }
    for p in &problems {
        eprintln!("beast-bench: {p}");
    }
    let mut printed_header = false;
    let mut summaries: Vec<Summary> = Vec::new();
    let mut emit = |s: &Summary| -> Result<(), String> {
        if args.json {
            println!("{}", output::json(s));
        } else if args.csv {
            if !printed_header {
                println!("{}", output::CSV_HEADER);
                printed_header = true;
            }
            println!("{}", output::csv(s));
        } else {
            output::print_table(s);
            println!();
        }
        if let Some(dir) = &args.hgrm {
            output::write_hgrm_files(dir, s)?;
        }
        Ok(())
    };

    let code = if let Some(((lo, hi), slo)) = search {
        let mut n = 0;
        let mut failure = None;
        let (best, trials) =
            search::bisect(lo, hi, args.search_steps, args.search_tolerance, |rate| {
                if failure.is_some() {
                    return false;
                }
                n += 1;
                let mut s = match one_run(args, &base, &format!("search {n}"), Some(rate)) {
                    Ok(s) => s,
                    Err(e) => {
                        failure = Some(e);
                        return false;
                    }
                };
                let p95 = s.report.corrected.value_at_quantile(0.95) as f64 / 1000.0;
                let ok =
                    p95 <= slo && s.achieved >= 0.95 * rate && !s.failed(args.max_error_fraction);
                s.slo_ok = Some(ok);
                if let Err(e) = emit(&s) {
                    failure = Some(e);
                }
                summaries.push(s);
                ok
            });
        if let Some(e) = failure {
            return Err(e);
        }
        let limited = summaries.iter().any(|s| s.generator_limited.is_some());
        if args.json {
            println!(
                "{}",
                output::search_json(best, slo, (lo, hi), summaries.len(), limited)
            );
        } else {
            let line = match best {
                Some(b) => format!("search: highest offered rate meeting p95 <= {slo} ms (achieved >= 95% of offered, errors within bounds): {b:.0} req/s after {} runs", summaries.len()),
                None => format!("search: no rate in {lo}..{hi} req/s met p95 <= {slo} ms"),
            };
            let trail: Vec<String> = trials
                .iter()
                .map(|t| format!("{:.0} {}", t.rate, if t.ok { "met" } else { "missed" }))
                .collect();
            let line = format!("{line}\n  trials: {}", trail.join(", "));
            if args.csv {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        }
        if limited {
            eprintln!("beast-bench: WARNING: some search runs were generator-limited; the answer may be the generator's limit, not the server's");
        }
        if best.is_some() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    } else {
        let rates: Vec<Option<f64>> = match (&sweep, &base.mode) {
            (Some(r), _) => r.iter().map(|&r| Some(r)).collect(),
            (None, Mode::Open { rate, .. }) => vec![Some(*rate)],
            (None, _) => vec![None],
        };
        let mut code = ExitCode::SUCCESS;
        for (i, rate) in rates.iter().enumerate() {
            let label = if rates.len() > 1 {
                format!("sweep {}/{}", i + 1, rates.len())
            } else {
                "run".to_string()
            };
            let s = one_run(args, &base, &label, *rate)?;
            emit(&s)?;
            if s.failed(args.max_error_fraction) {
                eprintln!(
                    "beast-bench: FAIL [{label}]: {} of {} requests erred ({}), went unanswered ({}) or were never sent ({})",
                    s.bad(),
                    s.report.sent + s.report.unsent,
                    s.report.errors(),
                    s.report.unanswered,
                    s.report.unsent
                );
                code = ExitCode::FAILURE;
            }
            if let Some(path) = &args.record_trace {
                write_recorded_trace(path, &base, &s.report)?;
            }
            summaries.push(s);
        }
        code
    };
    if let Some(path) = &args.plot {
        let title = format!("beast-bench {}", args.target);
        output::plot(path, &summaries.iter().collect::<Vec<_>>(), &title)?;
        eprintln!("beast-bench: plot written to {}", path.display());
    }
    if code != ExitCode::SUCCESS {
        // Said before the run too; repeated here where the verdict is read.
        for p in &problems {
            eprintln!("beast-bench: {p}");
        }
    }
    Ok(code)
}

/// One run at `rate` (None: the plan's own mode, closed loop or trace).
fn one_run(args: &Args, base: &Plan, label: &str, rate: Option<f64>) -> Result<Summary, String> {
    let mut plan = base.clone();
    if let (Some(r), Mode::Open { arrivals, .. }) = (rate, &base.mode) {
        plan.mode = Mode::Open {
            rate: r,
            arrivals: *arrivals,
        };
    }
    let mode = match &plan.mode {
        Mode::Open { arrivals, .. } => format!("open/{}", arrivals.label()),
        Mode::Closed => "closed".to_string(),
        Mode::Trace(_) => "trace".to_string(),
    };
    let offered = match &plan.mode {
        Mode::Open { rate, .. } => Some(*rate),
        Mode::Closed => None,
        Mode::Trace(per_conn) => {
            // Requests in the measured window per measured second.
            let from_us = (plan.warmup_s * 1e6) as u64;
            let n = per_conn.iter().flatten().filter(|e| e.0 >= from_us).count();
            Some(n as f64 / plan.duration_s)
        }
    };
    let before = args.admin.as_deref().and_then(|a| {
        admin::scrape(a)
            .map_err(|e| eprintln!("beast-bench: warning: {e}"))
            .ok()
    });
    let threads = plan.cpus.len();
    let (duration_s, warmup_s) = (plan.duration_s, plan.warmup_s);
    let closed = matches!(plan.mode, Mode::Closed);
    let (report, cpu_s) = if args.engine == "lean" && lean::applies(&plan) {
        lean::run(Arc::new(plan))?
    } else {
        load::run(Arc::new(plan))?
    };
    let admin = match (&before, args.admin.as_deref()) {
        (Some(b), Some(a)) => admin::scrape(a)
            .map_err(|e| eprintln!("beast-bench: warning: {e}"))
            .ok()
            .map(|after| admin::delta(b, &after)),
        _ => None,
    };
    let thread_cpu_max_pct =
        report.thread_cpu_s.iter().copied().fold(0.0, f64::max) / duration_s * 100.0;
    let generator_limited = output::generator_verdict(&report, thread_cpu_max_pct, closed);
    Ok(Summary {
        label: label.to_string(),
        mode,
        // A trace names its own targets.
        targets: match &base.mode {
            Mode::Trace(_) => base
                .targets
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(","),
            _ => args.target.clone(),
        },
        rows: args.rows,
        deadline_us: args.deadline_us,
        connections: args.connections,
        in_flight: args.in_flight,
        threads,
        offered,
        achieved: report.ok as f64 / duration_s,
        duration_s,
        warmup_s,
        report,
        cpu_s,
        thread_cpu_max_pct,
        generator_limited,
        admin,
        slo_ok: None,
        target_names: base.targets.iter().map(|t| t.name.clone()).collect(),
        node_names: match base.addrs.len() {
            1 => Vec::new(),
            _ => base.addrs.iter().map(|a| a.to_string()).collect(),
        },
    })
}

fn write_recorded_trace(
    path: &std::path::Path,
    plan: &Plan,
    r: &load::Report,
) -> Result<(), String> {
    let mut entries: Vec<TraceEntry> = r
        .trace
        .iter()
        .map(|&(o, t, row)| TraceEntry {
            offset_us: o,
            target: plan.targets[t as usize].name.clone(),
            row: row as usize,
        })
        .collect();
    entries.sort_by_key(|e| e.offset_us);
    let f = std::fs::File::create(path)
        .map_err(|e| format!("--record-trace {}: {e}", path.display()))?;
    let mut w = std::io::BufWriter::new(f);
    inputs::write_trace(&mut w, &entries)
        .and_then(|_| std::io::Write::flush(&mut w))
        .map_err(|e| format!("--record-trace {}: {e}", path.display()))?;
    eprintln!(
        "beast-bench: {} requests recorded to {}",
        entries.len(),
        path.display()
    );
    Ok(())
}
