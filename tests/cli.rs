//! The README's commands, run as a user runs them: the real `beast` binary,
//! a real socket, SIGTERM at the end.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BEAST: &str = env!("CARGO_BIN_EXE_beast");

/// `beast serve` on an ephemeral port; returns the child and its address.
fn serve(
    args: &[&str],
    dir: &std::path::Path,
) -> (Child, String, std::sync::mpsc::Receiver<String>) {
    let (child, addr, rx, _) = serve_with(args, dir, "", &[]);
    (child, addr, rx)
}

/// `serve` with `toml` at the top of its config file and `env` set; also
/// returns the log up to the "listening on" line (included).
fn serve_with(
    args: &[&str],
    dir: &std::path::Path,
    toml: &str,
    env: &[(&str, &str)],
) -> (
    Child,
    String,
    std::sync::mpsc::Receiver<String>,
    Vec<String>,
) {
    // Keep the cache file out of the working tree.
    let cfg = dir.join("beast.toml");
    std::fs::write(
        &cfg,
        format!(
            "{toml}\nadmin_listen = \"127.0.0.1:0\"\n[cache]\nl2_path = \"{}\"\nl2_bytes = 1048576\n",
            dir.join("l2.cache").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(BEAST)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--cores",
            "0",
            "--config",
        ])
        .arg(&cfg)
        .args(args)
        .env_remove("BEAST_BACKEND")
        .env_remove("BEAST_CUDA_DEVICE")
        .env_remove("BEAST_CUDA_PRECISION")
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = common::stderr_lines(&mut child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut log = Vec::new();
    loop {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("server did not start; log: {log:#?}");
        };
        if let Some(rest) = line.split("listening on ").nth(1) {
            let addr = rest.split_whitespace().next().unwrap().to_string();
            log.push(line);
            return (child, addr, rx, log);
        }
        log.push(line);
    }
}

fn sigterm_and_wait(mut child: Child, rx: std::sync::mpsc::Receiver<String>) -> Vec<String> {
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut status = None;
    common::wait_until(
        Duration::from_secs(15),
        "beast serve to stop on SIGTERM",
        || {
            status = child.try_wait().unwrap();
            status.is_some()
        },
    );
    let status = status.unwrap();
    assert!(status.success(), "beast serve exited with {status}");
    rx.try_iter().collect()
}

#[test]
fn serve_the_shipped_models_predict_and_stop_on_sigterm() {
    let dir = common::temp_dir("cli-serve");
    let (child, addr, rx) = serve(&[], &dir);
    // Four held-out digits through `beast predict --input-file`.
    let csv = dir.join("rows.csv");
    let holdout = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/digits_holdout.csv"
    ))
    .unwrap();
    let mut labels = Vec::new();
    let mut rows = String::new();
    for line in holdout.lines().skip(1).take(4) {
        let (features, label) = line.rsplit_once(',').unwrap();
        rows.push_str(features);
        rows.push('\n');
        labels.push(label.trim().parse::<usize>().unwrap());
    }
    std::fs::write(&csv, rows).unwrap();
    let out = Command::new(BEAST)
        .args([
            "predict",
            "--server",
            &addr,
            "--target",
            "digits",
            "--input-file",
        ])
        .arg(&csv)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let argmax: Vec<usize> = text
        .lines()
        .filter_map(|l| l.split("argmax ").nth(1))
        .map(|s| s.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(argmax, labels, "output:\n{text}");
    assert!(
        text.contains("digits_small v1, digits_medium v1, digits_large v1"),
        "{text}"
    );

    // One row with --input, and an error reported with a non-zero exit.
    let one = holdout.lines().nth(1).unwrap().rsplit_once(',').unwrap().0;
    let out = Command::new(BEAST)
        .args([
            "predict",
            "--server",
            &addr,
            "--target",
            "digits_small",
            "--input",
            one,
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = Command::new(BEAST)
        .args([
            "predict", "--server", &addr, "--target", "nope", "--input", "1,2",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));

    let log = sigterm_and_wait(child, rx);
    assert!(log.iter().any(|l| l.contains("stopped after")), "{log:#?}");
}

#[test]
fn demo_models_are_served() {
    let dir = common::temp_dir("cli-demo");
    let models = dir.join("models");
    let st = Command::new(BEAST)
        .args(["demo-models", "--out"])
        .arg(&models)
        .status()
        .unwrap();
    assert!(st.success());
    for m in ["bench_a", "bench_b", "bench_c"] {
        assert!(models
            .join(m)
            .join("1")
            .join("weights.safetensors")
            .exists());
    }
    let (child, addr, rx) = serve(&["--models", models.to_str().unwrap()], &dir);
    let row = vec!["0.5"; 256].join(",");
    let out = Command::new(BEAST)
        .args([
            "predict",
            "--server",
            &addr,
            "--target",
            "bench_ens",
            "--input",
            &row,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("bench_a v1, bench_b v1, bench_c v1"));
    sigterm_and_wait(child, rx);
}

#[test]
fn a_bad_repository_is_reported_with_file_and_field() {
    let dir = common::temp_dir("cli-bad");
    let models = dir.join("models");
    std::fs::create_dir_all(models.join("broken/1")).unwrap();
    std::fs::write(
        models.join("broken/model.toml"),
        "input_width = 4\noutput = \"softmax\"\nlayers = [{ units = 2, activation = \"relux\" }]\n",
    )
    .unwrap();
    let out = Command::new(BEAST)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            // Not the default 127.0.0.1:9464: another server on the
            // machine may hold it, and the bind would fail first.
            "--admin-listen",
            "off",
            "--cores",
            "0",
            "--models",
        ])
        .arg(&models)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a repository with no loadable model must not serve"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken/model.toml") && err.contains("activation"),
        "{err}"
    );
}

/// The backend: `--backend` over `BEAST_BACKEND` over the config file's
/// `backend`; the choice (and a CUDA fallback) is logged; a bad value
/// anywhere stops start-up with a message naming it.
#[test]
fn backend_flag_environment_and_file() {
    let dir = common::temp_dir("cli-backend");
    // The environment overrides the file.
    let (child, _, rx, log) =
        serve_with(&[], &dir, "backend = \"cuda\"", &[("BEAST_BACKEND", "cpu")]);
    sigterm_and_wait(child, rx);
    let all = log.join("\n");
    assert!(
        all.contains("BEAST_BACKEND=cpu overrides the config's backend"),
        "{all}"
    );
    assert!(!all.contains("CUDA unavailable"), "{all}");
    assert!(log.last().unwrap().contains("backend cpu"), "{all}");
    // The flag overrides both: CUDA is tried (here it may not start, and
    // the fallback says why).
    let (child, _, rx, log) = serve_with(
        &["--backend", "cuda"],
        &dir,
        "backend = \"cpu\"",
        &[("BEAST_BACKEND", "cpu")],
    );
    sigterm_and_wait(child, rx);
    let all = log.join("\n");
    assert!(
        all.contains("--backend cuda overrides BEAST_BACKEND"),
        "{all}"
    );
    assert!(
        all.contains("beast: backend: CUDA unavailable (")
            || log.last().unwrap().contains("backend cuda"),
        "{all}"
    );
    // Bad values, each named.
    let cfg = dir.join("bad.toml");
    for (toml, env, flag, named) in [
        ("", Some("gpu"), None, "BEAST_BACKEND=\"gpu\""),
        (
            "backend = \"gpu\"",
            None,
            None,
            "backend: unknown backend \"gpu\"",
        ),
        ("cuda_precision = \"fp8\"", None, None, "cuda_precision"),
        ("", None, Some("gpu"), "--backend"),
    ] {
        std::fs::write(&cfg, format!("admin_listen = \"off\"\n{toml}")).unwrap();
        let mut cmd = Command::new(BEAST);
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--cores",
            "0",
            "--config",
        ])
        .arg(&cfg)
        .env_remove("BEAST_BACKEND");
        if let Some(v) = env {
            cmd.env("BEAST_BACKEND", v);
        }
        if let Some(f) = flag {
            cmd.args(["--backend", f]);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{toml} {env:?} {flag:?}: {err}");
        assert!(err.contains(named), "{named}: {err}");
    }
}
