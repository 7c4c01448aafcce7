//! beast-eval: replay a labelled data set through a running server once
//! per selection policy (overridden per request) and once per member
//! model alone, and print what each costs and how often it is right.
//!
//! Data: CSV with a header row (features, a `label` column or else the
//! last column, and optionally a domain column named by `--domain-column`)
//! or a 2-D NPY (label in the last column; no domains). Requests go one
//! row at a time, one at a time, on one connection, with the cache
//! bypassed so every answer is computed. Under `bandit` every answer is
//! followed by feedback with the true label on the same connection, for
//! `--bandit-passes` passes over the data; the table reports the last
//! pass and the log each pass.
//!
//! Columns: accuracy; agreement of the answer with `all`'s; mean members
//! computed per request; compute saved against `all` (FLOPs from each
//! response's runs); p50/p99 round-trip latency.
//!
//! `--task regression` (or `auto`, the default, when the admin port's
//! /v1/models says the target is one): the label column holds values; the table reports
//! MAE and RMSE of the first output column against them, and the mean
//! absolute difference from `all`'s answer in place of agreement. The
//! policies that need class probabilities (cascade, bandit) are skipped.

use beast::client::{Client, ClientError, Prediction};
use beast::wire::{CacheControl, Input, PolicyOverride, RequestSpec};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "beast-eval",
    about = "Accuracy and cost of beast's member selection policies"
)]
struct Args {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7878")]
    server: String,
    /// Ensemble to evaluate.
    #[arg(long, default_value = "digits")]
    target: String,
    /// Labelled rows: .csv (header row) or .npy.
    #[arg(long, default_value = "models/digits_holdout.csv")]
    data: PathBuf,
    /// CSV column holding each row's domain (sent as the request domain).
    #[arg(long)]
    domain_column: Option<String>,
    /// Policies to run, comma-separated (all is always run first).
    #[arg(long, default_value = "all,cascade,deadline,bandit")]
    policies: String,
    /// Budget of each request under `deadline`, microseconds.
    #[arg(long, default_value_t = 2000)]
    deadline_us: u64,
    /// Passes over the data under `bandit` (feedback after every answer).
    #[arg(long, default_value_t = 3)]
    bandit_passes: usize,
    /// Skip the members-alone rows.
    #[arg(long)]
    no_members: bool,
    /// classification (argmax vs label), regression (value vs label), or
    /// auto: the target's task as the admin port's /v1/models says
    /// (classification when it does not answer).
    #[arg(long, default_value = "auto", value_parser = ["auto", "classification", "regression"])]
    task: String,
    /// The server's admin address (for --task auto).
    #[arg(long, default_value = "127.0.0.1:9464")]
    admin: String,
}

struct Data {
    width: usize,
    x: Vec<f32>,
    labels: Vec<u32>,
    /// The label column as numbers (regression targets).
    values: Vec<f64>,
    domains: Vec<String>,
}

impl Data {
    fn rows(&self) -> usize {
        self.labels.len()
    }
    fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.width..(i + 1) * self.width]
    }
}

fn read_data(path: &Path, domain_column: Option<&str>) -> Result<Data, String> {
    let at = |e: String| format!("{}: {e}", path.display());
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"))
    {
        if domain_column.is_some() {
            return Err(at("--domain-column needs a CSV".into()));
        }
        let bytes = std::fs::read(path).map_err(|e| at(e.to_string()))?;
        let (rows, cols, v) = beast::client::npy::read_f32_matrix(&bytes).map_err(at)?;
        if cols < 2 {
            return Err(at("needs features and a label column".into()));
        }
        let mut x = Vec::with_capacity(rows * (cols - 1));
        let mut labels = Vec::with_capacity(rows);
        for r in v.chunks_exact(cols) {
            x.extend_from_slice(&r[..cols - 1]);
            labels.push(r[cols - 1] as u32);
        }
        let values = v.chunks_exact(cols).map(|r| r[cols - 1] as f64).collect();
        return Ok(Data {
            width: cols - 1,
            x,
            domains: vec![String::new(); rows],
            labels,
            values,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| at(e.to_string()))?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| at("empty".into()))?
        .split(',')
        .map(str::trim)
        .collect();
    let label = header
        .iter()
        .position(|h| *h == "label")
        .unwrap_or(header.len() - 1);
    let domain = match domain_column {
        None => None,
        Some(d) => Some(
            header
                .iter()
                .position(|h| *h == d)
                .ok_or_else(|| at(format!("no column named {d:?}")))?,
        ),
    };
    let width = header.len() - 1 - domain.is_some() as usize;
    let mut data = Data {
        width,
        x: Vec::new(),
        labels: Vec::new(),
        values: Vec::new(),
        domains: Vec::new(),
    };
    for (i, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() != header.len() {
            return Err(at(format!(
                "line {}: {} fields, header has {}",
                i + 2,
                f.len(),
                header.len()
            )));
        }
        for (j, v) in f.iter().enumerate() {
            if j == label {
                let l: f64 = v
                    .parse()
                    .map_err(|_| at(format!("line {}: label {v:?}", i + 2)))?;
                data.labels.push(l as u32);
                data.values.push(l);
            } else if Some(j) == domain {
                data.domains.push(v.to_string());
            } else {
                data.x.push(
                    v.parse()
                        .map_err(|_| at(format!("line {}: {v:?}", i + 2)))?,
                );
            }
        }
        if domain.is_none() {
            data.domains.push(String::new());
        }
    }
    Ok(data)
}

/// One answer, reduced to what the table needs.
#[derive(Clone, Copy, Default)]
struct Outcome {
    answer: Option<usize>,
    /// The first output column (a regression's value).
    value: Option<f32>,
    members: u32,
    flops: u64,
    partial: bool,
    latency: Duration,
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b })
}

fn ask(
    c: &Client,
    target: &str,
    x: &[f32],
    domain: &str,
    policy: PolicyOverride,
    deadline_us: Option<u64>,
) -> Result<(Outcome, Option<Prediction>), ClientError> {
    let spec = RequestSpec {
        target,
        version: None,
        rows: 1,
        cols: x.len() as u32,
        input: Input::F32(x),
        deadline_us,
        domain: (!domain.is_empty()).then_some(domain),
        cache: CacheControl::Bypass,
        policy,
    };
    let t = Instant::now();
    let r = c.predict(&spec);
    let latency = t.elapsed();
    match r {
        Ok(p) => Ok((
            Outcome {
                answer: Some(argmax(&p.outputs[..p.cols as usize])),
                value: p.outputs.first().copied(),
                members: p.runs.iter().filter(|r| r.2 > 0).count() as u32,
                flops: p.runs.iter().map(|r| r.2).sum(),
                partial: p.partial,
                latency,
            },
            Some(p),
        )),
        Err(ClientError::DeadlineExceeded(_)) | Err(ClientError::Overloaded(_)) => Ok((
            Outcome {
                latency,
                ..Outcome::default()
            },
            None,
        )),
        Err(e) => Err(e),
    }
}

struct Row {
    name: String,
    acc: f64,
    agree: f64,
    members: f64,
    saved: f64,
    p50: Duration,
    p99: Duration,
    unanswered: usize,
    partial: usize,
    /// Regression: (MAE, RMSE, mean |answer − all's answer|).
    errors: Option<(f64, f64, f64)>,
}

fn summarise(name: &str, out: &[Outcome], data: &Data, all: &[Outcome]) -> Row {
    let n = out.len() as f64;
    let correct = out
        .iter()
        .zip(&data.labels)
        .filter(|(o, &l)| o.answer == Some(l as usize))
        .count();
    let agree = if all.is_empty() {
        1.0
    } else {
        out.iter()
            .zip(all)
            .filter(|(o, a)| o.answer.is_some() && o.answer == a.answer)
            .count() as f64
            / n
    };
    let flops: u64 = out.iter().map(|o| o.flops).sum();
    let flops_all: u64 = all.iter().map(|o| o.flops).sum::<u64>().max(1);
    let mut lat: Vec<Duration> = out.iter().map(|o| o.latency).collect();
    lat.sort();
    let pct = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    Row {
        name: name.to_string(),
        acc: correct as f64 / n * 100.0,
        agree: agree * 100.0,
        members: out.iter().map(|o| o.members as f64).sum::<f64>() / n,
        saved: (1.0 - flops as f64 / flops_all as f64) * 100.0,
        p50: pct(0.5),
        p99: pct(0.99),
        unanswered: out.iter().filter(|o| o.answer.is_none()).count(),
        partial: out.iter().filter(|o| o.partial).count(),
        errors: None,
    }
}

/// MAE, RMSE against the labels and the mean absolute difference from
/// `all`'s answers, over the answered rows.
fn regression_errors(out: &[Outcome], data: &Data, all: &[Outcome]) -> (f64, f64, f64) {
    let (mut abs, mut sq, mut diff, mut n) = (0.0, 0.0, 0.0, 0usize);
    for (i, o) in out.iter().enumerate() {
        let Some(v) = o.value else { continue };
        let e = v as f64 - data.values[i];
        abs += e.abs();
        sq += e * e;
        if let Some(a) = all.get(i).and_then(|a| a.value) {
            diff += (v - a).abs() as f64;
        }
        n += 1;
    }
    let n = n.max(1) as f64;
    (abs / n, (sq / n).sqrt(), diff / n)
}

fn run() -> Result<(), String> {
    let a = Args::parse();
    let regression = match a.task.as_str() {
        "regression" => true,
        "auto" => beast::client::labels::fetch_target_info(&a.admin, &a.target)
            .is_some_and(|t| t.regression),
        _ => false,
    };
    let data = read_data(&a.data, a.domain_column.as_deref())?;
    let summarise = |name: &str, out: &[Outcome], data: &Data, all: &[Outcome]| {
        let mut r = summarise(name, out, data, all);
        if regression {
            r.errors = Some(regression_errors(out, data, all));
        }
        r
    };
    let c = Client::connect(&a.server).map_err(|e| format!("connect {}: {e}", a.server))?;
    let err = |e: ClientError| e.to_string();
    let n = data.rows();
    let pass = |policy: PolicyOverride, deadline: Option<u64>, feedback: bool| {
        let mut out = Vec::with_capacity(n);
        let mut members: Vec<String> = Vec::new();
        for i in 0..n {
            let (o, p) = ask(
                &c,
                &a.target,
                data.row(i),
                &data.domains[i],
                policy,
                deadline,
            )?;
            if let Some(p) = &p {
                for r in &p.runs {
                    if !members.contains(&r.0) {
                        members.push(r.0.clone());
                    }
                }
                if feedback && p.ticket != 0 {
                    c.feedback(p.ticket, data.labels[i])?;
                }
            }
            out.push(o);
        }
        Ok::<_, ClientError>((out, members))
    };
    let (all, members) = pass(PolicyOverride::All, None, false).map_err(err)?;
    let mut rows = vec![summarise("all", &all, &data, &all)];
    let mut feedback_sent = 0;
    for p in a.policies.split(',').map(str::trim) {
        let (policy, deadline) = match p {
            "all" => continue,
            "cascade" => (PolicyOverride::Cascade, None),
            "deadline" => (PolicyOverride::Deadline, Some(a.deadline_us)),
            "bandit" => (PolicyOverride::Bandit, None),
            other => return Err(format!("unknown policy {other:?}")),
        };
        if regression && matches!(policy, PolicyOverride::Cascade | PolicyOverride::Bandit) {
            eprintln!("beast-eval: {p}: skipped (needs class probabilities; --task regression)");
            continue;
        }
        if policy == PolicyOverride::Bandit {
            let mut last = Vec::new();
            for k in 1..=a.bandit_passes.max(1) {
                let (out, _) = pass(policy, None, true).map_err(err)?;
                feedback_sent += out.iter().filter(|o| o.answer.is_some()).count();
                let r = summarise("bandit", &out, &data, &all);
                eprintln!(
                    "bandit pass {k}: accuracy {:.2}%, {:.2} members/request, {:.1}% saved, {feedback_sent} feedback messages so far",
                    r.acc, r.members, r.saved
                );
                last = out;
            }
            let name = format!(
                "bandit (pass {} of {})",
                a.bandit_passes.max(1),
                a.bandit_passes.max(1)
            );
            rows.push(summarise(&name, &last, &data, &all));
        } else {
            let (out, _) = pass(policy, deadline, false).map_err(err)?;
            let name = match deadline {
                Some(d) => format!("{p} ({d} µs budget)"),
                None => p.to_string(),
            };
            rows.push(summarise(&name, &out, &data, &all));
        }
    }
    if !a.no_members {
        for m in &members {
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                let (o, _) = ask(
                    &c,
                    m,
                    data.row(i),
                    &data.domains[i],
                    PolicyOverride::Default,
                    None,
                )
                .map_err(err)?;
                out.push(o);
            }
            rows.push(summarise(&format!("{m} alone"), &out, &data, &all));
        }
    }
    println!(
        "{} on {} ({n} rows), one request of one row at a time, cache bypassed",
        a.target,
        a.data.display()
    );
    println!();
    if regression {
        println!("| policy | MAE | RMSE | mean abs diff from all | members run | compute saved | p50 | p99 |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    } else {
        println!(
            "| policy | accuracy | agreement with all | members run | compute saved | p50 | p99 |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|");
    }
    for r in &rows {
        let mut note = String::new();
        if r.unanswered > 0 {
            note += &format!(" ({} not answered)", r.unanswered);
        }
        if r.partial > 0 {
            note += &format!(" ({} partial)", r.partial);
        }
        let quality = match r.errors {
            Some((mae, rmse, diff)) => format!("{mae:.4} | {rmse:.4} | {diff:.4}"),
            None => format!("{:.2}% | {:.2}%", r.acc, r.agree),
        };
        println!(
            "| {}{note} | {quality} | {:.2} | {:.1}% | {} µs | {} µs |",
            r.name,
            r.members,
            r.saved,
            r.p50.as_micros(),
            r.p99.as_micros()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("beast-eval: {e}");
            ExitCode::FAILURE
        }
    }
}
