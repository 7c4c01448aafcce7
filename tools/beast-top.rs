//! beast-top: a live terminal view of a running server.
//!
//! Polls the admin port's `/v1/stats` every second and shows, per core,
//! requests/s, p50/p99 latency, in-flight requests and connections, and
//! per target requests/s, p50/p99, errors and shed requests, mean batch
//! size, plus cache hit rates by tier. Rates and percentiles are over the
//! last interval (the difference of two snapshots). While a model's
//! shadow or canary rollout runs (and for the last decided ones), a
//! rollouts panel shows its figures from `/v1/models` (`lifecycle`):
//! mode, versions, compared requests, agreement, max |diff|, the p99
//! ratio candidate/current, accuracy with feedback, and the decision.
//!
//! ```text
//! beast-top --admin 127.0.0.1:9464
//! ```
//!
//! `q` (or Esc, or Ctrl-C) quits; the terminal is restored on exit and on
//! panic. [`render`] draws one snapshot into any ratatui backend, so the
//! test drives it headless with `TestBackend`.

use beast::metrics::stats::{interval_quantile, Stats};
use beast::metrics::TargetKind;
use clap::Parser;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style, Stylize};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::Frame;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "beast-top",
    about = "Live view of a running beast server (from its admin port)"
)]
struct Args {
    /// The server's admin address, ADDR:PORT.
    #[arg(long, default_value = "127.0.0.1:9464")]
    admin: String,
    /// Refresh interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // Fail before taking over the terminal when the server is not there.
    if let Err(e) = fetch(&args.admin) {
        eprintln!("beast-top: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("beast-top: terminal: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = run(&mut terminal, &args);
    ratatui::restore();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("beast-top: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(terminal: &mut ratatui::DefaultTerminal, args: &Args) -> Result<(), String> {
    let interval = Duration::from_millis(args.interval_ms.max(100));
    let mut prev: Option<Stats> = None;
    let mut cur: Option<Stats> = None;
    let mut rollouts = Vec::new();
    let mut error = String::new();
    let mut next = Instant::now();
    loop {
        if Instant::now() >= next {
            next = Instant::now() + interval;
            match fetch(&args.admin) {
                Ok(s) => {
                    prev = cur.take();
                    cur = Some(s);
                    error.clear();
                    // An older server without the lifecycle: no panel.
                    rollouts = fetch_rollouts(&args.admin).unwrap_or_default();
                }
                Err(e) => error = e,
            }
        }
        let title = if error.is_empty() {
            args.admin.clone()
        } else {
            format!("{} — {error}", args.admin)
        };
        terminal
            .draw(|f| match &cur {
                Some(c) => render(f, &title, c, prev.as_ref(), &rollouts),
                None => f.render_widget(Paragraph::new(title.as_str()), f.area()),
            })
            .map_err(|e| format!("draw: {e}"))?;
        let wait = next.saturating_duration_since(Instant::now());
        if event::poll(wait).map_err(|e| format!("terminal: {e}"))? {
            if let Event::Key(k) = event::read().map_err(|e| format!("terminal: {e}"))? {
                let ctrl_c =
                    k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                if k.kind == KeyEventKind::Press
                    && (k.code == KeyCode::Char('q') || k.code == KeyCode::Esc || ctrl_c)
                {
                    return Ok(());
                }
            }
        }
    }
}

/// One rollout's figures as shown (from `/v1/models` `lifecycle`).
#[derive(Debug, Clone, Default)]
pub struct Rollout(pub serde_json::Value);

/// Running rollouts, then the last [`DECIDED_SHOWN`] decided ones.
pub fn fetch_rollouts(admin: &str) -> Result<Vec<Rollout>, String> {
    let (code, body) = beast::server::admin::get(admin, "/v1/models", Duration::from_secs(5))?;
    if code != 200 {
        return Err(format!("{admin}/v1/models: HTTP {code}"));
    }
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("{admin}/v1/models: {e}"))?;
    let list = |k: &str| v["lifecycle"][k].as_array().cloned().unwrap_or_default();
    let decided = list("rollouts_decided");
    let skip = decided.len().saturating_sub(DECIDED_SHOWN);
    Ok(list("rollouts")
        .into_iter()
        .chain(decided.into_iter().skip(skip))
        .map(Rollout)
        .collect())
}

/// Decided rollouts shown below the running ones.
pub const DECIDED_SHOWN: usize = 3;

impl Rollout {
    /// One line: `m v1->v2 canary 50%  compared 120  agree 0.9917  ...`.
    pub fn line(&self) -> String {
        let r = &self.0;
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        let u = |k: &str| r[k].as_u64().unwrap_or(0);
        let ratio = if f("p99_us_current") > 0.0 {
            format!("{:.2}", f("p99_us_candidate") / f("p99_us_current"))
        } else {
            "-".into()
        };
        let acc = |k: &str| r[k].as_f64().map_or("-".into(), |a| format!("{a:.1}%"));
        let state = r["decision"]
            .as_str()
            .map_or("running".to_string(), |d| d.to_string());
        format!(
            "{} v{}->v{} {} {:.0}%  compared {}  agree {:.4}  max|diff| {:.4}  p99 x{ratio}  errors {}/{}  acc {}/{} ({}/{} labels)  {state}",
            r["model"].as_str().unwrap_or("?"),
            u("current"),
            u("candidate"),
            r["mode"].as_str().unwrap_or("?"),
            f("fraction") * 100.0,
            u("compared"),
            f("agreement"),
            f("max_abs_diff"),
            u("errors_candidate"),
            u("errors_current"),
            acc("accuracy_candidate"),
            acc("accuracy_current"),
            u("labels_candidate"),
            u("labels_current"),
        )
    }
}

/// One `/v1/stats` snapshot.
pub fn fetch(admin: &str) -> Result<Stats, String> {
    let (code, body) = beast::server::admin::get(admin, "/v1/stats", Duration::from_secs(5))?;
    if code != 200 {
        return Err(format!("{admin}/v1/stats: HTTP {code}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("{admin}/v1/stats: {e}"))
}

fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2}M", r / 1e6)
    } else if r >= 1e4 {
        format!("{:.1}k", r / 1e3)
    } else {
        format!("{r:.1}")
    }
}

fn fmt_secs(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 1e-3 => format!("{:.0}µs", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.2}ms", s * 1e3),
        Some(s) => format!("{s:.2}s"),
    }
}

fn fmt_bytes(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

/// Differences between two snapshots, per second.
struct Delta<'a> {
    cur: &'a Stats,
    prev: Option<&'a Stats>,
    secs: f64,
}

impl Delta<'_> {
    /// Per-second rate of a counter read by `f` from a snapshot.
    fn rate(&self, f: impl Fn(&Stats) -> Option<u64>) -> f64 {
        let now = f(self.cur).unwrap_or(0);
        let before = self.prev.and_then(&f).unwrap_or(0);
        now.saturating_sub(before) as f64 / self.secs
    }
    fn diff(&self, f: impl Fn(&Stats) -> Option<u64>) -> u64 {
        f(self.cur)
            .unwrap_or(0)
            .saturating_sub(self.prev.and_then(&f).unwrap_or(0))
    }
}

/// Draw one snapshot. `prev` (the snapshot before) turns counters into
/// rates and bucket counts into percentiles over the interval; without it
/// they are averages since the server started.
pub fn render(f: &mut Frame, title: &str, cur: &Stats, prev: Option<&Stats>, rollouts: &[Rollout]) {
    let prev = prev.filter(|p| p.uptime_seconds < cur.uptime_seconds);
    let secs = match prev {
        Some(p) => cur.uptime_seconds - p.uptime_seconds,
        None => cur.uptime_seconds,
    }
    .max(1e-3);
    let d = Delta { cur, prev, secs };
    let bounds = &cur.latency_bounds_us;

    let rollouts_h = if rollouts.is_empty() {
        0
    } else {
        rollouts.len() as u16 + 2
    };
    let [head, cores_area, targets_area, rollouts_area, foot] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(cur.cores.len() as u16 + 3),
        Constraint::Min(4),
        Constraint::Length(rollouts_h),
        Constraint::Length(3),
    ])
    .areas(f.area());
    if !rollouts.is_empty() {
        let lines: Vec<Line> = rollouts.iter().map(|r| Line::from(r.line())).collect();
        f.render_widget(
            Paragraph::new(lines).block(
                Block::bordered().title(" rollouts (candidate/current: errors, accuracy, labels) "),
            ),
            rollouts_area,
        );
    }

    // Header: identity, uptime, process.
    let cpu = match (cur.process, prev.and_then(|p| p.process)) {
        (Some(c), Some(p)) => format!(
            "cpu {:.0}%",
            (c.cpu_seconds - p.cpu_seconds).max(0.0) / secs * 100.0
        ),
        (Some(c), None) => format!("cpu {:.0}%", c.cpu_seconds / secs * 100.0),
        _ => "cpu -".into(),
    };
    let rss = cur
        .process
        .map_or("-".into(), |p| fmt_bytes(p.resident_bytes));
    let total_rate = d.rate(|s| Some(s.cores.iter().map(|c| c.requests).sum()));
    let header = vec![
        Line::from(format!(
            "beast-top — {title} — beast {} ({}) — up {:.0}s",
            cur.version, cur.backend, cur.uptime_seconds
        ))
        .bold(),
        Line::from(format!(
            "{} req/s total   {cpu}   rss {rss}   (q quits)",
            fmt_rate(total_rate)
        )),
    ];
    f.render_widget(Paragraph::new(header), head);

    // Per core.
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let rows: Vec<Row> = cur
        .cores
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let p = prev
                .and_then(|p| p.cores.get(i))
                .filter(|p| p.core == c.core);
            let pb = p.map(|p| p.latency_buckets.as_slice());
            let batches = c.batches - p.map_or(0, |p| p.batches).min(c.batches);
            let rows = c.batch_rows - p.map_or(0, |p| p.batch_rows).min(c.batch_rows);
            Row::new(vec![
                c.core.to_string(),
                fmt_rate(d.rate(|s| s.cores.get(i).map(|c| c.requests))),
                fmt_secs(interval_quantile(bounds, pb, &c.latency_buckets, 0.5)),
                fmt_secs(interval_quantile(bounds, pb, &c.latency_buckets, 0.99)),
                c.in_flight.to_string(),
                c.connections_open.to_string(),
                fmt_rate(batches as f64 / secs),
                if batches > 0 {
                    format!("{:.1}", rows as f64 / batches as f64)
                } else {
                    "-".into()
                },
            ])
        })
        .collect();
    let widths = [
        Constraint::Length(6),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(8),
        Constraint::Length(10),
        Constraint::Length(10),
    ];
    let table = Table::new(rows, widths)
        .header(
            Row::new([
                "core",
                "req/s",
                "p50",
                "p99",
                "in-flight",
                "conns",
                "batch/s",
                "rows/batch",
            ])
            .style(bold),
        )
        .block(Block::bordered().title(" cores "));
    f.render_widget(table, cores_area);

    // Per target.
    let rows: Vec<Row> = cur
        .targets
        .iter()
        .enumerate()
        .filter(|(_, t)| t.requests > 0 || t.batches > 0)
        .map(|(i, t)| {
            let p = prev
                .and_then(|p| p.targets.get(i))
                .filter(|p| p.name == t.name);
            let pb = p.map(|p| p.latency_buckets.as_slice());
            let get = |sel: fn(&beast::metrics::stats::TargetStats) -> u64| {
                move |s: &Stats| s.targets.get(i).filter(|x| x.name == t.name).map(sel)
            };
            let batches = d.diff(get(|t| t.batches));
            let rows = d.diff(get(|t| t.batch_rows));
            let kind = match t.kind {
                Some(TargetKind::Model) => "model",
                Some(TargetKind::Ensemble) => "ensemble",
                _ => "-",
            };
            Row::new(vec![
                t.name.clone(),
                kind.to_string(),
                fmt_rate(d.rate(get(|t| t.requests))),
                fmt_secs(interval_quantile(bounds, pb, &t.latency_buckets, 0.5)),
                fmt_secs(interval_quantile(bounds, pb, &t.latency_buckets, 0.99)),
                fmt_rate(d.rate(get(|t| t.errors))),
                fmt_rate(d.rate(get(|t| t.shed))),
                if batches > 0 {
                    format!("{:.1}", rows as f64 / batches as f64)
                } else {
                    "-".into()
                },
                format!("{}/{}/{}", t.ok, t.errors, t.shed),
            ])
        })
        .collect();
    let widths = [
        Constraint::Min(12),
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(11),
        Constraint::Length(20),
    ];
    let table = Table::new(rows, widths)
        .header(
            Row::new([
                "target",
                "kind",
                "req/s",
                "p50",
                "p99",
                "err/s",
                "shed/s",
                "rows/batch",
                "ok/err/shed total",
            ])
            .style(bold),
        )
        .block(Block::bordered().title(" targets "));
    f.render_widget(table, targets_area);

    // Cache and shedding.
    let hit = |tier: &'static str| move |s: &Stats| s.cache.hits.get(tier).copied();
    let (l1, l2) = (d.diff(hit("l1")), d.diff(hit("l2")));
    let lookups = l1 + l2 + d.diff(|s| Some(s.cache.misses));
    let pct = |n: u64| {
        if lookups > 0 {
            format!("{:.1}%", n as f64 * 100.0 / lookups as f64)
        } else {
            "-".into()
        }
    };
    let cache = format!(
        "cache: l1 hit {}  l2 hit {}  lookups/s {}  coalesced/s {}",
        pct(l1),
        pct(l2),
        fmt_rate(lookups as f64 / secs),
        fmt_rate(d.rate(|s| Some(s.cache.coalesced)))
    );
    let shed: Vec<String> = cur
        .shed
        .keys()
        .map(|k| format!("{k} {}", fmt_rate(d.rate(|s| s.shed.get(k).copied()))))
        .collect();
    let foot_text = vec![
        Line::from(cache),
        Line::from(format!("shed/s: {}", shed.join("  "))),
    ];
    f.render_widget(Paragraph::new(foot_text).block(Block::default()), foot);
}

#[cfg(test)]
mod tests {
    use super::*;
    use beast::client::Client;
    use beast::config::Config;
    use beast::model::load::Repository;
    use beast::model::{Activation, EnsembleSpec, Model, OutputTransform};
    use beast::wire::{CacheControl, Input, RequestSpec};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;
    use std::sync::Arc;

    fn text(t: &Terminal<TestBackend>) -> String {
        let buf = t.backend().buffer();
        let mut s = String::new();
        for y in 0..buf.area.height {
            for x in 0..buf.area.width {
                s.push_str(buf[(x, y)].symbol());
            }
            s.push('\n');
        }
        s
    }

    #[test]
    fn renders_a_real_servers_stats_headless() {
        let mut repo = Repository::default();
        for (name, seed) in [("alpha", 1), ("beta", 2)] {
            let m = Model::random(
                name,
                &[8, 16, 3],
                Activation::Relu,
                OutputTransform::Softmax,
                seed,
            );
            repo.models.insert(name.into(), vec![Arc::new(m)]);
        }
        repo.ensembles.insert(
            "duo".into(),
            EnsembleSpec {
                name: "duo".into(),
                members: vec!["alpha".into(), "beta".into()],
                combiner: beast::model::Combiner::Mean,
                weights: vec![],
                selection: Default::default(),
            },
        );
        let cfg = Config {
            listen: "127.0.0.1:0".into(),
            admin_listen: "127.0.0.1:0".into(),
            cores: vec![0],
            pin_shards: false,
            ..Config::default()
        };
        let server = beast::server::start(cfg, Arc::new(repo)).unwrap();
        let admin = server.admin_addr.unwrap().to_string();
        let before = fetch(&admin).unwrap();
        let client = Client::connect(server.addr).unwrap();
        let x = vec![0.25f32; 8];
        for target in ["alpha", "alpha", "beta", "duo", "duo", "duo"] {
            let spec = RequestSpec {
                target,
                version: None,
                rows: 1,
                cols: 8,
                input: Input::F32(&x),
                deadline_us: None,
                domain: None,
                cache: CacheControl::Use,
                policy: beast::wire::PolicyOverride::Default,
            };
            client.predict(&spec).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
        let after = fetch(&admin).unwrap();
        let mut term = Terminal::new(TestBackend::new(120, 30)).unwrap();
        term.draw(|f| render(f, &admin, &after, Some(&before), &[]))
            .unwrap();
        let screen = text(&term);
        eprintln!("{screen}");
        for needle in [
            "alpha",
            "beta",
            "duo",
            "cores",
            "targets",
            "cache: l1 hit",
            "2/0/0",
            "3/0/0",
        ] {
            assert!(screen.contains(needle), "no {needle:?} in\n{screen}");
        }
        // The core's row shows a non-zero request rate.
        let core_row = screen
            .lines()
            .find(|l| l.trim_start_matches('│').trim_start().starts_with("0 "))
            .unwrap_or_else(|| panic!("no core row in\n{screen}"));
        let rate: f64 = core_row
            .trim_start_matches('│')
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert!(rate > 0.0, "{core_row}");
        // The target row of alpha shows a non-zero rate too.
        let alpha = screen.lines().find(|l| l.contains("alpha ")).unwrap();
        let rate: f64 = alpha
            .trim_start_matches('│')
            .split_whitespace()
            .nth(2)
            .unwrap()
            .parse()
            .unwrap();
        assert!(rate > 0.0, "{alpha}");
        // Without a previous snapshot it still draws (averages since start).
        term.draw(|f| render(f, &admin, &after, None, &[])).unwrap();
        assert!(text(&term).contains("alpha"));
        server.shutdown();
    }

    #[test]
    fn shows_a_running_shadow_rollouts_figures() {
        let mut repo = Repository::default();
        let versions = (1..=2)
            .map(|v| {
                let mut m = Model::random(
                    "alpha",
                    &[8, 16, 3],
                    Activation::Relu,
                    OutputTransform::Softmax,
                    1,
                );
                m.version = v;
                Arc::new(m)
            })
            .collect();
        repo.models.insert("alpha".into(), versions);
        repo.rollouts.insert(
            "alpha".into(),
            beast::model::rollout::parse_rollout(
                "mode = \"shadow\"\nfraction = 1.0\ncandidate = 2\n",
            )
            .unwrap(),
        );
        let cfg = Config {
            listen: "127.0.0.1:0".into(),
            admin_listen: "127.0.0.1:0".into(),
            cores: vec![0],
            pin_shards: false,
            ..Config::default()
        };
        let server = beast::server::start(cfg, Arc::new(repo)).unwrap();
        let admin = server.admin_addr.unwrap().to_string();
        let client = Client::connect(server.addr).unwrap();
        for i in 0..5 {
            let x = vec![i as f32; 8];
            let spec = RequestSpec {
                target: "alpha",
                version: None,
                rows: 1,
                cols: 8,
                input: Input::F32(&x),
                deadline_us: None,
                domain: None,
                cache: CacheControl::Use,
                policy: beast::wire::PolicyOverride::Default,
            };
            client.predict(&spec).unwrap();
        }
        // The comparer runs after the answers: wait for its count.
        let deadline = Instant::now() + Duration::from_secs(30);
        let rollouts = loop {
            let r = fetch_rollouts(&admin).unwrap();
            if r.first().is_some_and(|r| r.0["compared"] == 5) {
                break r;
            }
            assert!(Instant::now() < deadline, "not compared: {r:?}");
            std::thread::sleep(Duration::from_millis(10));
        };
        let stats = fetch(&admin).unwrap();
        let mut term = Terminal::new(TestBackend::new(220, 30)).unwrap();
        term.draw(|f| render(f, &admin, &stats, None, &rollouts))
            .unwrap();
        let screen = text(&term);
        eprintln!("{screen}");
        for needle in [
            "rollouts",
            "alpha v1->v2 shadow 100%",
            "compared 5",
            "agree 1.0000",
            "max|diff| 0.0000",
            "errors 0/0",
            "running",
        ] {
            assert!(screen.contains(needle), "no {needle:?} in\n{screen}");
        }
        server.shutdown();
    }
}
