//! The client side of the `beast` command line: `beast predict`, `beast
//! trace` and the admin calls of `beast models ...` (the binary, src/main.rs,
//! only parses arguments and calls these).

use crate::client::Client;
use crate::wire::{CacheControl, Input, RequestSpec};
use std::path::{Path, PathBuf};

/// One admin request (`beast models ...`), its JSON answer printed pretty.
pub fn admin_call(method: &str, admin: &str, path: &str) -> Result<(), String> {
    let timeout = std::time::Duration::from_secs(120);
    let (code, body) = crate::server::admin::request(method, admin, path, timeout)?;
    let pretty = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| body.trim().to_string());
    if code == 200 {
        println!("{pretty}");
        Ok(())
    } else {
        Err(format!("{admin}{path}: HTTP {code}:\n{pretty}"))
    }
}

pub fn trace(admin: &str, seconds: f64, out: &Path) -> Result<(), String> {
    let path = format!("/debug/trace?seconds={seconds}");
    eprintln!("beast: recording traces from {admin} for {seconds} s");
    let timeout = std::time::Duration::from_secs_f64(seconds.max(0.0) + 30.0);
    let (code, body) = crate::server::admin::get(admin, &path, timeout)?;
    if code != 200 {
        return Err(format!("{admin}{path}: HTTP {code}: {}", body.trim()));
    }
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("{admin}{path}: not JSON: {e}"))?;
    std::fs::write(out, &body).map_err(|e| format!("{}: {e}", out.display()))?;
    let other = &v["otherData"];
    eprintln!(
        "beast: wrote {} ({} sampled requests, sample rate {}); open it in https://ui.perfetto.dev",
        out.display(),
        other["records"],
        other["sample_rate"]
    );
    if other["records"] == 0 {
        eprintln!(
            "beast: note: {}",
            other["note"].as_str().unwrap_or("no requests were sampled")
        );
    }
    Ok(())
}

pub struct PredictArgs {
    pub server: String,
    pub target: String,
    pub input: Option<String>,
    pub input_file: Option<PathBuf>,
    pub version: Option<u32>,
    pub deadline_us: Option<u64>,
    pub domain: Option<String>,
    pub f16: bool,
    pub no_cache: bool,
    pub policy: String,
    pub admin: String,
}

pub fn predict(a: PredictArgs) -> Result<(), String> {
    let policy = crate::wire::PolicyOverride::ALL
        .into_iter()
        .find(|p| p.name() == a.policy)
        .ok_or_else(|| {
            format!(
                "--policy {}: expected default, all, cascade, deadline or bandit",
                a.policy
            )
        })?;
    let (rows, cols, data) = match (&a.input, &a.input_file) {
        (Some(s), None) => {
            let row = parse_row(s).map_err(|e| format!("--input: {e}"))?;
            (1, row.len(), row)
        }
        (None, Some(p)) => read_rows(p)?,
        _ => return Err("give --input 0.1,0.2,... or --input-file rows.csv|rows.npy".into()),
    };
    let f16: Vec<u16> = data
        .iter()
        .map(|&x| half::f16::from_f32(x).to_bits())
        .collect();
    let input = if a.f16 {
        Input::F16(&f16)
    } else {
        Input::F32(&data)
    };
    let spec = RequestSpec {
        target: &a.target,
        version: a.version,
        rows: rows as u32,
        cols: cols as u32,
        input,
        deadline_us: a.deadline_us,
        domain: a.domain.as_deref(),
        cache: if a.no_cache {
            CacheControl::Bypass
        } else {
            CacheControl::Use
        },
        policy,
    };
    let client = Client::connect(&a.server).map_err(|e| format!("connect {}: {e}", a.server))?;
    let p = client.predict(&spec).map_err(|e| format!("{e}"))?;
    let info = (!a.admin.is_empty())
        .then(|| crate::client::labels::fetch_target_info(&a.admin, &a.target))
        .flatten()
        .unwrap_or_default();
    for (r, row) in p.outputs.chunks_exact(p.cols.max(1) as usize).enumerate() {
        println!("{}", crate::client::labels::describe_row(r, row, &info));
    }
    let runs: Vec<String> = p.runs.iter().map(|(m, v, _)| format!("{m} v{v}")).collect();
    println!(
        "models: {}; server time {} us (queue {} us, compute {} us){}",
        runs.join(", "),
        p.timings.total_us,
        p.timings.queue_us,
        p.timings.compute_us,
        if p.cached { "; cached" } else { "" }
    );
    if p.partial {
        println!("partial: members were cut off by the deadline");
    }
    if p.ticket != 0 {
        println!("ticket {} (for feedback)", p.ticket);
    }
    Ok(())
}

fn parse_row(s: &str) -> Result<Vec<f32>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<f32>()
                .map_err(|_| format!("'{t}' is not a number"))
        })
        .collect()
}

/// Rows from CSV (an optional non-numeric header row is skipped) or NPY.
fn read_rows(path: &Path) -> Result<(usize, usize, Vec<f32>), String> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext.eq_ignore_ascii_case("npy") {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        return crate::client::npy::read_f32_matrix(&bytes)
            .map_err(|e| format!("{}: {e}", path.display()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut data = Vec::new();
    let mut cols = 0;
    let mut rows = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_row(line) {
            Ok(row) => {
                if cols == 0 {
                    cols = row.len();
                } else if row.len() != cols {
                    return Err(format!(
                        "{}: line {}: {} values, expected {cols}",
                        path.display(),
                        i + 1,
                        row.len()
                    ));
                }
                data.extend(row);
                rows += 1;
            }
            Err(e) if rows == 0 && i == 0 => {
                let _ = e; // header row
            }
            Err(e) => return Err(format!("{}: line {}: {e}", path.display(), i + 1)),
        }
    }
    if rows == 0 {
        return Err(format!("{}: no rows", path.display()));
    }
    Ok((rows, cols, data))
}
