//! A new user's first hour, as issue 11 found it: what the binaries say
//! when something is missing or refused. Each test runs the real binaries
//! against a real server.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

const BEAST: &str = env!("CARGO_BIN_EXE_beast");
const BENCH: &str = env!("CARGO_BIN_EXE_beast-bench");

/// A repository with `digits_small` (copied from models/) and a model
/// folder that is refused.
fn repo_with_a_refusal(dir: &Path) -> PathBuf {
    let models = dir.join("models");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/digits_small");
    std::fs::create_dir_all(models.join("digits_small/1")).unwrap();
    for f in ["model.toml", "1/weights.safetensors"] {
        std::fs::copy(shipped.join(f), models.join("digits_small").join(f)).unwrap();
    }
    std::fs::create_dir_all(models.join("broken/1")).unwrap();
    std::fs::write(models.join("broken/model.toml"), "input_width = 4\n").unwrap();
    models
}

/// A server child that is killed if a test panics before stopping it
/// (otherwise it would outlive the test and hold its output pipe).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `beast serve` in `cwd` with `config`; its log up to "listening on".
fn serve(
    cwd: &Path,
    models: &Path,
    config: &str,
) -> (Server, String, Receiver<String>, Vec<String>) {
    let cfg = cwd.join(format!(
        "beast-{}.toml",
        std::process::id() ^ config.len() as u32
    ));
    std::fs::write(&cfg, config).unwrap();
    let mut child = Command::new(BEAST)
        .current_dir(cwd)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--cores",
            "0",
            "--models",
        ])
        .arg(models)
        .arg("--config")
        .arg(&cfg)
        .env_remove("BEAST_BACKEND")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = common::stderr_lines(&mut child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut log = Vec::new();
    loop {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            let _ = child.kill();
            panic!("server did not start; log: {log:#?}");
        };
        if let Some(rest) = line.split("listening on ").nth(1) {
            let addr = rest.split_whitespace().next().unwrap().to_string();
            log.push(line);
            return (Server(child), addr, rx, log);
        }
        log.push(line);
    }
}

fn stop(mut server: Server) {
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(server.0.id() as i32, libc::SIGTERM) };
    common::wait_until(Duration::from_secs(15), "beast serve to stop", || {
        server.0.try_wait().unwrap().is_some()
    });
}

const CONFIG: &str = "admin_listen = \"off\"\n[cache]\nl2_bytes = 1048576\n";

#[test]
fn each_refusal_is_printed_once_and_errors_read_as_text() {
    let dir = common::temp_dir("first-hour-refusal");
    let models = repo_with_a_refusal(&dir);
    let l2 = dir.join("l2.cache");
    let (child, addr, _rx, log) = serve(
        &dir,
        &models,
        &format!("{CONFIG}l2_path = \"{}\"\n", l2.display()),
    );
    let mentions = log
        .iter()
        .filter(|l| l.contains("broken/model.toml"))
        .count();
    assert_eq!(
        mentions, 1,
        "the refusal of broken/ should be printed once: {log:#?}"
    );
    // A client error in words, not Rust's debug form (was `NotFound("unknown target 'nope'")`).
    let out = Command::new(BEAST)
        .args([
            "predict", "--server", &addr, "--target", "nope", "--input", "1,2",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("beast: error: not found: unknown target 'nope'")
            && !err.contains("NotFound("),
        "{err}"
    );
    let out = Command::new(BEAST)
        .args([
            "predict",
            "--server",
            &addr,
            "--target",
            "digits_small",
            "--input",
            "1,2",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad request: input has 2 columns") && !err.contains("BadRequest("),
        "{err}"
    );
    stop(child);
    // One "beast:" prefix per line, not two (was `beast: error: beast: cannot open …`).
    let out = Command::new(BEAST)
        .args(["cache", "inspect"])
        .arg(dir.join("no-such.cache"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("beast: error: cannot open") && !err.contains("beast: error: beast:"),
        "{err}"
    );
}

#[test]
fn a_second_server_in_the_same_folder_names_the_l2_file_and_inspect_names_targets() {
    let dir = common::temp_dir("first-hour-l2");
    let models = repo_with_a_refusal(&dir);
    // Both with the default, relative cache.l2_path, started in one folder.
    let (first, addr, _rx1, log1) = serve(&dir, &models, CONFIG);
    let (second, _, _rx2, log2) = serve(&dir, &models, CONFIG);
    let file = dir.join("beast-l2.cache");
    let l2_line = |log: &[String]| {
        log.iter()
            .find(|l| l.contains("L2"))
            .cloned()
            .unwrap_or_default()
    };
    assert!(
        l2_line(&log1).contains(&file.display().to_string()),
        "{log1:#?}"
    );
    let line = l2_line(&log2);
    assert!(
        line.contains(&format!("cannot use the L2 file {}", file.display()))
            && line.contains("locked"),
        "the second server must name the absolute file it could not use: {log2:#?}"
    );
    stop(second);
    // An answer the first server caches, then written back at its stop.
    let row: Vec<String> = (0..64)
        .map(|i| format!("{}", (i % 7) as f32 / 7.0))
        .collect();
    let out = Command::new(BEAST)
        .args([
            "predict",
            "--server",
            &addr,
            "--target",
            "digits_small",
            "--input",
            &row.join(","),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stop(first);
    let out = Command::new(BEAST)
        .args(["cache", "inspect"])
        .arg(&file)
        .arg("--models")
        .arg(&models)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entry = text
        .lines()
        .find(|l| l.contains("(tag "))
        .unwrap_or_default();
    assert!(
        entry.trim_start().starts_with("digits_small") && entry.contains(" 1  (tag "),
        "the entry should be shown under its target's name: {text}"
    );
}

#[test]
fn beast_bench_names_a_missing_default_target_and_how_to_get_it() {
    let dir = common::temp_dir("first-hour-bench");
    let models = repo_with_a_refusal(&dir);
    let (child, addr, _rx, _) = serve(
        &dir,
        &models,
        "admin_listen = \"off\"\n[cache]\nl2_path = \"\"\n",
    );
    // The default target, bench_ens, is not among these models.
    let out = Command::new(BENCH)
        .args([
            "--server",
            &addr,
            "--rate",
            "200",
            "--duration",
            "0.3",
            "--warmup",
            "0",
            "-c",
            "1",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("target 'bench_ens' is not served at")
            && err.contains("beast demo-models --out")
            && err.contains("--target digits --width 64"),
        "{err}"
    );
    // A served target with the wrong width says which width to give.
    let out = Command::new(BENCH)
        .args([
            "--server",
            &addr,
            "--target",
            "digits_small",
            "--rate",
            "200",
            "--duration",
            "0.3",
            "--warmup",
            "0",
            "-c",
            "1",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("target 'digits_small' refuses") && err.contains("--width N"),
        "{err}"
    );
    stop(child);
}

/// Every command the README shows (in `sh` blocks and inline code) names a
/// binary `cargo build --release` builds, and a subcommand and flags it
/// has; the first block is the two fresh-clone commands (server, tests),
/// the second builds every binary and puts them on PATH.
#[test]
fn readme_commands_work_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let cargo = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let bins: Vec<String> = cargo
        .split("[[bin]]")
        .skip(1)
        .filter_map(|s| s.lines().find_map(|l| l.strip_prefix("name = ")))
        .map(|n| n.trim_matches('"').to_string())
        .collect();
    assert!(bins.len() >= 4, "{bins:?}");
    // sh blocks, with `\` continuations joined.
    let mut blocks: Vec<Vec<String>> = Vec::new();
    let mut cur: Option<Vec<String>> = None;
    for line in readme.lines() {
        match (&mut cur, line.trim_start()) {
            (None, l) if l.starts_with("```sh") => cur = Some(Vec::new()),
            (Some(_), l) if l.starts_with("```") => blocks.push(cur.take().unwrap()),
            (Some(b), l) => match b.last_mut() {
                Some(prev) if prev.ends_with('\\') => {
                    prev.pop();
                    prev.push(' ');
                    prev.push_str(l);
                }
                _ => b.push(l.to_string()),
            },
            (None, _) => {}
        }
    }
    // The first block: the two commands of a fresh clone (run the server on
    // its built-in defaults, run the tests).
    let first = blocks.first().expect("an sh block");
    assert!(
        first.len() == 2
            && first[0].starts_with("cargo run --release -- serve")
            && first[1].starts_with("cargo test --release"),
        "the README's first block must be the server and the tests: {first:?}"
    );
    // The second: every binary built and put on PATH for what follows.
    let tools = blocks.get(1).expect("a second sh block");
    assert!(
        tools[0].starts_with("cargo build --release") && !tools[0].contains("--bin "),
        "the README's second block must build every binary: {tools:?}"
    );
    assert!(
        tools
            .iter()
            .any(|l| l.starts_with("export PATH=") && l.contains("target/release")),
        "the second block must put target/release on PATH: {tools:?}"
    );
    let mut commands: Vec<String> = blocks
        .iter()
        .flatten()
        .map(|l| {
            l.split(" #")
                .next()
                .unwrap()
                .trim()
                .trim_end_matches('&')
                .trim()
                .to_string()
        })
        .collect();
    // Inline code: `beast predict`, `beast-top --admin ...`.
    commands.extend(readme.split('`').skip(1).step_by(2).map(str::to_string));
    let mut checked = 0;
    for cmd in commands {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let Some(bin) = words
            .first()
            .map(|w| w.trim_start_matches("target/release/"))
        else {
            continue;
        };
        if !(bin == "beast" || bin.starts_with("beast-")) || bin.contains([':', '.']) {
            continue;
        }
        assert!(
            bins.iter().any(|b| b == bin),
            "README runs `{cmd}`, but `{bin}` is not a binary of Cargo.toml ({bins:?})"
        );
        let exe = root.join("target/release").join(bin);
        let exe = if exe.exists() {
            exe
        } else {
            PathBuf::from(BEAST).with_file_name(bin)
        };
        // Descend into subcommands while the next word is one.
        let mut sub: Vec<&str> = Vec::new();
        let help = |sub: &[&str]| -> String {
            let out = Command::new(&exe).args(sub).arg("--help").output().unwrap();
            assert!(
                out.status.success(),
                "`{bin} {} --help` fails (README: `{cmd}`)",
                sub.join(" ")
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let mut text = help(&sub);
        for w in &words[1..] {
            let is_sub = text
                .split("Commands:")
                .nth(1)
                .is_some_and(|c| c.lines().any(|l| l.split_whitespace().next() == Some(w)));
            if !is_sub {
                break;
            }
            sub.push(w);
            text = help(&sub);
        }
        for flag in words.iter().filter(|w| w.starts_with("--")) {
            let flag = flag.split('=').next().unwrap();
            assert!(
                text.contains(&format!("{flag} ")) || text.contains(&format!("{flag}\n")),
                "README: `{cmd}`: `{bin} {}` has no flag {flag}",
                sub.join(" ")
            );
        }
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} README commands found");
}
