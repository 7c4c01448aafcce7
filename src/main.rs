//! `beast`: the server and its command-line companions.
//!
//! - `beast serve` — run the server (defaults: 127.0.0.1:7878, every core,
//!   the repository shipped in `models/`).
//! - `beast predict` — ask a running server for one prediction.
//! - `beast demo-models --out DIR` — write the standard benchmark models.
//! - `beast import-trees MODEL --out DIR` — an XGBoost/LightGBM model file
//!   as a model version folder.
//! - `beast trace --admin ADDR --seconds N --out trace.json` — record sampled
//!   request traces from a running server (Chrome trace JSON, for Perfetto).

use beast::config::Config;
use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[derive(Parser)]
#[command(
    name = "beast",
    version,
    about = "Bare-metal inference server for FP16 model ensembles"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server until SIGINT/SIGTERM.
    Serve {
        /// Model repository folder (default: the repository shipped in models/).
        #[arg(long)]
        models: Option<PathBuf>,
        /// Address to listen on, ADDR:PORT (default 127.0.0.1:7878).
        #[arg(long)]
        listen: Option<String>,
        /// Admin HTTP address for /metrics and friends, ADDR:PORT or "off" (default 127.0.0.1:9464).
        #[arg(long)]
        admin_listen: Option<String>,
        /// CPUs to run shards on, e.g. "0" or "0,2-3" (default: all).
        #[arg(long)]
        cores: Option<String>,
        /// Backend: auto, cpu or cuda (default: auto with the cuda feature,
        /// cpu without); overrides the config file and BEAST_BACKEND.
        #[arg(long, value_parser = ["auto", "cpu", "cuda"])]
        backend: Option<String>,
        /// TOML config file; flags override it (see docs/CONFIG.md).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Send one prediction request to a running server and print the answer.
    Predict {
        /// Server address, ADDR:PORT.
        #[arg(long, default_value = "127.0.0.1:7878")]
        server: String,
        /// Model or ensemble name.
        #[arg(long)]
        target: String,
        /// One row of comma-separated numbers.
        #[arg(long, conflicts_with = "input_file", allow_hyphen_values = true)]
        input: Option<String>,
        /// Rows from a .csv (numbers only, or a header row) or a 2-D .npy (f32/f64/f16).
        #[arg(long)]
        input_file: Option<PathBuf>,
        /// Model version (default: latest).
        #[arg(long)]
        version: Option<u32>,
        /// Time budget in microseconds.
        #[arg(long)]
        deadline_us: Option<u64>,
        /// Domain tag.
        #[arg(long)]
        domain: Option<String>,
        /// Send the input as FP16 instead of f32.
        #[arg(long)]
        f16: bool,
        /// Bypass the prediction cache.
        #[arg(long)]
        no_cache: bool,
        /// Ensemble member selection for this request: default (the
        /// ensemble's own), all, cascade, deadline or bandit.
        #[arg(long, default_value = "default")]
        policy: String,
        /// The server's admin address, read for the target's class names
        /// and task (/v1/models); "" to skip.
        #[arg(long, default_value = "127.0.0.1:9464")]
        admin: String,
    },
    /// Import a saved XGBoost JSON (.json) or LightGBM text (.txt) model as
    /// a model version folder, model.toml beside it (docs/MODELS.md).
    ImportTrees(beast::model::trees::import::ImportArgs),
    /// Write the standard benchmark models (bench_a, bench_b, bench_c, bench_ens).
    DemoModels {
        #[arg(long)]
        out: PathBuf,
    },
    /// Convert an ONNX MLP (Gemm/MatMul, Relu/Tanh/Sigmoid/Gelu, norms,
    /// Softmax; see docs/MODELS.md) into a model folder the server loads.
    ImportOnnx(beast::import::onnx::ImportArgs),
    /// Record sampled request traces for N seconds into Chrome trace-event
    /// JSON (open in https://ui.perfetto.dev). Needs trace_sample_rate > 0.
    Trace {
        /// The server's admin address, ADDR:PORT.
        #[arg(long, default_value = "127.0.0.1:9464")]
        admin: String,
        /// How long to record (0: whatever the trace rings hold now).
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Output file.
        #[arg(long, default_value = "trace.json")]
        out: PathBuf,
    },
    /// Look into a prediction cache file.
    Cache {
        #[command(subcommand)]
        cmd: CacheCmd,
    },
    /// List, load, unload or reload models on a running server, without a
    /// restart (through its admin port; docs/MODELS.md "Lifecycle").
    Models {
        #[command(subcommand)]
        cmd: ModelsCmd,
        /// The server's admin address.
        #[arg(long, default_value = "127.0.0.1:9464", global = true)]
        admin: String,
    },
}

#[derive(Subcommand)]
enum ModelsCmd {
    /// Print the models and ensembles served, and the lifecycle state.
    List,
    /// Rescan the repository and apply what changed (as SIGHUP does).
    Reload,
    /// Load a model (again), or one version of it.
    Load {
        name: String,
        #[arg(long)]
        version: Option<u32>,
    },
    /// Stop serving a model, or one version of it.
    Unload {
        name: String,
        #[arg(long)]
        version: Option<u32>,
    },
}

#[derive(Subcommand)]
enum CacheCmd {
    /// Print the L2 file's header, occupancy and entries per target (safe beside a running server).
    Inspect {
        file: PathBuf,
        /// Repository whose model and ensemble names label the entries
        /// (default: the shipped models/; the file stores only a tag per name).
        #[arg(long)]
        models: Option<PathBuf>,
    },
    /// Drop every cached answer of a target on a running server (through its admin port).
    Purge {
        /// The server's admin address.
        #[arg(long, default_value = "127.0.0.1:9464")]
        admin: String,
        /// Model or ensemble name.
        #[arg(long)]
        target: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve {
            models,
            listen,
            admin_listen,
            cores,
            backend,
            config,
        } => serve(ServeArgs {
            models,
            listen,
            admin_listen,
            cores,
            backend,
            config,
        }),
        Cmd::Predict {
            server,
            target,
            input,
            input_file,
            version,
            deadline_us,
            domain,
            f16,
            no_cache,
            policy,
            admin,
        } => beast::cli::predict(beast::cli::PredictArgs {
            server,
            target,
            input,
            input_file,
            version,
            deadline_us,
            domain,
            f16,
            no_cache,
            policy,
            admin,
        }),
        Cmd::Cache {
            cmd: CacheCmd::Inspect { file, models },
        } => beast::cache::inspect(&file).and_then(|report| {
            let repo = models.unwrap_or_else(beast::config::default_models_dir);
            let names = beast::cache::names::repository_targets(&repo)?;
            print!(
                "{}",
                beast::cache::names::label_targets(&report, &names, &repo)
            );
            Ok(())
        }),
        Cmd::Cache {
            cmd: CacheCmd::Purge { admin, target },
        } => {
            let path = format!("/v1/cache/purge?target={target}");
            match beast::server::admin::request(
                "POST",
                &admin,
                &path,
                std::time::Duration::from_secs(10),
            ) {
                Ok((200, body)) => {
                    println!("{}", body.trim());
                    Ok(())
                }
                Ok((code, body)) => Err(format!("{admin}: {code}: {}", body.trim())),
                Err(e) => Err(e),
            }
        }
        Cmd::Models { cmd, admin } => models(cmd, &admin),
        Cmd::ImportOnnx(args) => {
            beast::import::onnx::import_file(&args).map(|report| print!("{report}"))
        }
        Cmd::ImportTrees(args) => beast::model::trees::import::run(&args),
        Cmd::DemoModels { out } => beast::model::demo::write_demo_repository(&out)
            .map(|()| {
                eprintln!(
                    "beast: wrote bench_a, bench_b, bench_c and ensemble bench_ens to {}",
                    out.display()
                )
            })
            .map_err(|e| format!("{}: {e}", out.display())),
        Cmd::Trace {
            admin,
            seconds,
            out,
        } => beast::cli::trace(&admin, seconds, &out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Some library errors already carry the prefix: say it once.
            eprintln!("beast: error: {}", e.strip_prefix("beast: ").unwrap_or(&e));
            ExitCode::FAILURE
        }
    }
}

/// `beast models ...`: one admin request, its answer printed.
fn models(cmd: ModelsCmd, admin: &str) -> Result<(), String> {
    let q = |v: Option<u32>| v.map_or(String::new(), |v| format!("?version={v}"));
    let (method, path) = match cmd {
        ModelsCmd::List => ("GET", "/v1/models".to_string()),
        ModelsCmd::Reload => ("POST", "/v1/repository/reload".to_string()),
        ModelsCmd::Load { name, version } => {
            ("POST", format!("/v1/models/{name}/load{}", q(version)))
        }
        ModelsCmd::Unload { name, version } => {
            ("POST", format!("/v1/models/{name}/unload{}", q(version)))
        }
    };
    beast::cli::admin_call(method, admin, &path)
}

/// "0,2-3" → [0, 2, 3].
fn parse_cores(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("--cores: cannot read '{part}' (expected e.g. 0,2-3)");
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (usize, usize) =
                (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if a > b {
                return Err(bad());
            }
            out.extend(a..=b);
        } else {
            out.push(part.parse().map_err(|_| bad())?);
        }
    }
    if out.is_empty() {
        return Err("--cores: empty list".into());
    }
    Ok(out)
}

struct ServeArgs {
    models: Option<PathBuf>,
    listen: Option<String>,
    admin_listen: Option<String>,
    cores: Option<String>,
    backend: Option<String>,
    config: Option<PathBuf>,
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let ServeArgs {
        models,
        listen,
        admin_listen,
        cores,
        backend,
        config,
    } = args;
    // Signals first: SIGINT/SIGTERM during the slow start-up steps exit 0
    // at once; once the server runs they stop it gracefully.
    let running = on_stop_signals()?;
    let mut cfg = match &config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    if let Some(m) = models {
        cfg.models_dir = m;
    }
    if let Some(l) = listen {
        cfg.listen = l;
    }
    if let Some(a) = admin_listen {
        cfg.admin_listen = a;
    }
    if let Some(c) = cores {
        cfg.cores = parse_cores(&c)?;
    }
    // The backend: the flag, else BEAST_BACKEND (and friends), else the file.
    for line in cfg.apply_backend_env(|name| std::env::var(name).ok())? {
        eprintln!("beast: backend: {line}");
    }
    if let Some(b) = backend {
        if cfg.backend != b && std::env::var("BEAST_BACKEND").is_ok() {
            eprintln!("beast: backend: --backend {b} overrides BEAST_BACKEND");
        }
        cfg.backend = b;
    }
    // Checks the port and brings up the admin port before the slow steps.
    let starting = beast::server::Starting::begin(cfg)?;
    let cfg = starting.config();
    if let Some(a) = starting.admin_addr() {
        eprintln!("beast: admin port on http://{a} (/metrics, /healthz, /readyz, /v1/models, /v1/stats, /debug/trace); /readyz answers 503 until start-up is done");
    }
    starting.step("loading models");
    let mut repo = beast::model::load::load_repository(&cfg.models_dir, &cfg.batch.limits())?;
    if repo.models.is_empty() {
        return Err(format!(
            "{}: no model could be loaded",
            cfg.models_dir.display()
        ));
    }
    starting.step("calibrating cascades");
    beast::ensemble::calibrate::calibrate_cascades(&mut repo, &cfg.models_dir);
    eprintln!("beast: models from {}", cfg.models_dir.display());
    for versions in repo.models.values() {
        for m in versions {
            let dims = m.shape_summary();
            // The delay bounds a wait only for a model that asks for
            // fuller batches (docs/CONFIG.md): show it only then.
            let wait = if m.batch.min_batch > 1 {
                format!(
                    ", min_batch {} (waits up to {} us)",
                    m.batch.min_batch, m.batch.max_queue_delay_us
                )
            } else {
                String::new()
            };
            eprintln!(
                "beast:   model {} v{} (digest {}): {} {:?}, {:.2} MFLOP/row, max_batch {}{wait}{}",
                m.name,
                m.version,
                m.short_digest(),
                dims,
                m.output,
                m.flops_per_row() as f64 / 1e6,
                m.batch.max_batch,
                m.io.describe(m.task),
            );
        }
    }
    for e in repo.ensembles.values() {
        let sel = &e.selection;
        let policy = match sel.policy {
            beast::model::Policy::Cascade => format!(
                "cascade ({:?} >= {:.3})",
                sel.cascade_metric, sel.cascade_threshold
            ),
            p => format!("{p:?}").to_lowercase(),
        };
        eprintln!(
            "beast:   ensemble {}: {:?} of [{}], policy {policy}",
            e.name,
            e.combiner,
            e.members.join(", ")
        );
    }
    // Each refusal was logged once, as it happened ("beast: refused: ..."):
    // only their number here.
    if !repo.errors.is_empty() {
        eprintln!(
            "beast:   refused: {} model(s) or version(s), {} ensemble(s) (see above)",
            repo.refused_models, repo.refused_ensembles
        );
    }
    let cpus = cfg.shard_cpus();
    let handle = starting.start(Arc::new(repo))?;
    handle.exit_on_stalled_stop();
    *running.lock().unwrap_or_else(|e| e.into_inner()) =
        Some((handle.stop_flag(), handle.lifecycle()));
    eprintln!(
        "beast: listening on {} with {} shard(s) on CPUs {:?}, backend {}",
        handle.addr,
        cpus.len(),
        cpus,
        handle.backend
    );
    let totals = handle.wait();
    eprintln!(
        "beast: stopped after {} responses ({} ok), {} batches, mean batch {:.1} rows",
        totals.requests(),
        totals.responses[0],
        totals.batches,
        totals.batch_rows as f64 / totals.batches.max(1) as f64
    );
    Ok(())
}

/// Handle SIGINT, SIGTERM and SIGHUP on a thread of their own. While the
/// returned slot is empty (start-up), SIGINT/SIGTERM log a line and exit 0
/// at once: nothing is served yet, and every start-up step is safe to cut
/// off (the L2 file is repaired when next opened, as after a crash); SIGHUP
/// is logged and ignored. Once the slot holds the server's stop flag and
/// lifecycle: SIGINT stops gracefully (answers what is in flight) and exits
/// 0; SIGTERM drains first when `drain_s` > 0 (a second one stops at once);
/// SIGHUP rescans the repository and applies what changed.
type Running = Arc<Mutex<Option<(Arc<AtomicBool>, Arc<beast::server::lifecycle::Lifecycle>)>>>;

fn on_stop_signals() -> Result<Running, String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| format!("signal handler: {e}"))?;
    let running: Running = Arc::new(Mutex::new(None));
    let slot = running.clone();
    std::thread::Builder::new()
        .name("beast-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let name = match sig {
                    SIGINT => "SIGINT",
                    SIGTERM => "SIGTERM",
                    _ => "SIGHUP",
                };
                // Held while deciding, so start-up cannot end in between.
                let running = slot.lock().unwrap_or_else(|e| e.into_inner());
                match &*running {
                    None if sig == SIGHUP => {
                        eprintln!("beast: SIGHUP during start-up: ignored (the repository is being loaded)");
                    }
                    None => {
                        eprintln!("beast: {name} during start-up: exiting before serving");
                        // SAFETY: _exit ends the process at once; no
                        // destructors or atexit handlers run while other
                        // threads are mid-step.
                        unsafe { libc::_exit(0) };
                    }
                    Some((_, lifecycle)) if sig == SIGHUP => {
                        let l = lifecycle.clone();
                        drop(running);
                        // A reload takes a while: off the signal thread,
                        // one at a time (apply serialises them).
                        let _ = std::thread::Builder::new()
                            .name("beast-sighup".into())
                            .spawn(move || {
                                let _ = l.apply(&beast::server::lifecycle::Change::Rescan, "SIGHUP");
                            });
                    }
                    Some((stop, lifecycle)) => {
                        if sig == SIGTERM && lifecycle.drain_s() > 0.0 && !lifecycle.is_draining() {
                            lifecycle.drain(lifecycle.drain_s(), name);
                        } else if !stop.swap(true, Ordering::SeqCst) {
                            eprintln!("beast: {name}: stopping (answering requests in flight)");
                        }
                    }
                }
            }
        })
        .map_err(|e| format!("signal thread: {e}"))?;
    Ok(running)
}
