//! Model lifecycle without a restart, against a real server: a new
//! version and a changed ensemble swap in under load with every request
//! answered OK; each bad deploy is refused (the answer names the file and
//! the reason) while the old version keeps answering; SIGHUP rescans and
//! picks up a version folder renamed into place; SIGTERM with `drain_s`
//! and `POST /v1/drain` make /readyz 503 at once while still serving.

mod common;

use beast::client::Client;
use beast::model::demo::write_model;
use beast::model::load::load_repository;
use beast::model::{Activation, F16Storage, Model, OutputTransform};
use beast::server::admin::{get, request};
use common::{rows, spec, wait_until, CLASSES, WIDTH};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn model(name: &str, version: u32, hidden: usize, seed: u64) -> Model {
    let mut m = Model::random(
        name,
        &[WIDTH, hidden, CLASSES],
        Activation::Relu,
        OutputTransform::Softmax,
        seed,
    );
    m.version = version;
    m.batch.max_batch = 16;
    m
}

/// Write `m` as `<dir>/<name>/<version>` the way docs/MODELS.md says a
/// deploy should: under a dot-name first, renamed into place when complete.
fn deploy(dir: &Path, m: &Model) {
    let tmp = dir.join(".staging");
    let _ = std::fs::remove_dir_all(&tmp);
    write_model(&tmp, m).unwrap();
    let mdir = dir.join(&m.name);
    std::fs::create_dir_all(&mdir).unwrap();
    std::fs::copy(
        tmp.join(&m.name).join("model.toml"),
        mdir.join("model.toml"),
    )
    .unwrap();
    let staged = mdir.join(format!(".tmp-{}", m.version));
    let _ = std::fs::remove_dir_all(&staged);
    std::fs::rename(tmp.join(&m.name).join(m.version.to_string()), &staged).unwrap();
    std::fs::rename(&staged, mdir.join(m.version.to_string())).unwrap();
}

fn post(admin: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let (code, body) = request("POST", &admin.to_string(), path, T).unwrap();
    let v = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(_) => serde_json::Value::String(body),
    };
    (code, v)
}

fn start(
    dir: &Path,
    extra: impl FnOnce(&mut beast::config::Config),
) -> beast::server::ServerHandle {
    let mut cfg = common::test_config();
    cfg.models_dir = dir.to_path_buf();
    extra(&mut cfg);
    let repo = load_repository(dir, &cfg.batch.limits()).unwrap();
    assert!(repo.errors.is_empty(), "{:?}", repo.errors);
    common::start_with(cfg, repo)
}

/// (version of `m` that answered, members run) of one request.
fn ask(c: &Client, target: &str, seed: u64) -> Result<Vec<(String, u32)>, String> {
    let x = rows(seed, 1, WIDTH);
    let p = c
        .predict(&spec(target, 1, WIDTH, &x))
        .map_err(|e| format!("{e}"))?;
    Ok(p.runs.into_iter().map(|(n, v, _)| (n, v)).collect())
}

#[test]
fn a_new_version_and_a_changed_ensemble_swap_in_under_load_without_a_failed_request() {
    let dir = common::temp_dir("reload-swap");
    deploy(&dir, &model("m", 1, 16, 1));
    deploy(&dir, &model("a", 1, 8, 2));
    deploy(&dir, &model("c", 1, 12, 3));
    std::fs::write(
        dir.join("ensembles.toml"),
        "[ensembles.ens]\nmembers = [\"a\", \"m\"]\ncombiner = \"mean\"\n",
    )
    .unwrap();
    let h = start(&dir, |_| {});
    let admin = h.admin_addr.unwrap();
    let addr = h.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    // (target, the models and versions that answered it), each once.
    type Seen = Vec<(String, Vec<(String, u32)>)>;
    let seen: Arc<Mutex<Seen>> = Default::default();
    let errors: Arc<Mutex<Vec<String>>> = Default::default();
    let threads: Vec<_> = (0..3)
        .map(|t| {
            let (stop, ok, failed, seen, errors) = (
                stop.clone(),
                ok.clone(),
                failed.clone(),
                seen.clone(),
                errors.clone(),
            );
            std::thread::spawn(move || {
                let c = Client::connect(addr).unwrap();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let target = if i.is_multiple_of(2) { "m" } else { "ens" };
                    match ask(&c, target, t * 1_000_000 + i) {
                        Ok(runs) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            let mut s = seen.lock().unwrap();
                            if !s.iter().any(|(tg, r)| tg == target && *r == runs) {
                                s.push((target.to_string(), runs));
                            }
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            errors.lock().unwrap().push(e);
                        }
                    }
                }
                i
            })
        })
        .collect();
    let answered = |target: &str, want: &[(&str, u32)]| {
        let want: Vec<(String, u32)> = want.iter().map(|(n, v)| (n.to_string(), *v)).collect();
        seen.lock()
            .unwrap()
            .iter()
            .any(|(t, r)| t == target && *r == want)
    };
    wait_until(T, "answers from m v1", || answered("m", &[("m", 1)]));

    // A new version, renamed into place, then a rescan.
    deploy(&dir, &model("m", 2, 16, 4));
    let (code, v) = post(admin, "/v1/repository/reload");
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["loaded"][0]
            .as_str()
            .unwrap()
            .split(' ')
            .take(2)
            .collect::<Vec<_>>(),
        ["m", "v2"],
        "{v}"
    );
    assert!(v["ensembles_changed"].as_array().unwrap().is_empty(), "{v}");
    wait_until(T, "answers from m v2", || answered("m", &[("m", 2)]));
    wait_until(T, "ens on m v2", || answered("ens", &[("a", 1), ("m", 2)]));

    // Unload v1 by hand; change the ensemble's members.
    let (code, v) = post(admin, "/v1/models/m/unload?version=1");
    assert_eq!(code, 200, "{v}");
    assert!(
        v["unloaded"][0].as_str().unwrap().starts_with("m v1"),
        "{v}"
    );
    std::fs::write(
        dir.join("ensembles.toml"),
        "[ensembles.ens]\nmembers = [\"a\", \"c\", \"m\"]\ncombiner = \"mean\"\n",
    )
    .unwrap();
    let (code, v) = post(admin, "/v1/repository/reload");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["ensembles_changed"], serde_json::json!(["ens"]), "{v}");
    wait_until(T, "ens with c", || {
        answered("ens", &[("a", 1), ("c", 1), ("m", 2)])
    });
    // A version asked for by number is gone; version 0 is the current one.
    let c = Client::connect(addr).unwrap();
    let x = rows(9, 1, WIDTH);
    let mut s = spec("m", 1, WIDTH, &x);
    s.version = Some(1);
    assert!(c.predict(&s).is_err(), "m v1 was unloaded");
    s.version = Some(0);
    assert_eq!(c.predict(&s).unwrap().runs[0].1, 2);

    stop.store(true, Ordering::Relaxed);
    let sent: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "failed answers: {:?}", errors.lock().unwrap());
    assert_eq!(ok, sent, "every request answered");
    // The retired versions were dropped once their work was done.
    wait_until(T, "old versions unloaded", || {
        common::metric(admin, "beast_registry_versions_alive") == Some(1.0)
    });
    assert_eq!(
        common::metric(admin, "beast_registry_generation"),
        Some(4.0)
    );
    h.shutdown();
}

/// A model that overflows to infinity on a zero input: passes every file
/// check, fails the warm-up.
fn overflowing(name: &str) -> Model {
    let dims = [WIDTH, 4, 4, 4, 4, 4, 4, 4, 4, 4, CLASSES];
    let mut m = Model::random(
        name,
        &dims,
        Activation::Identity,
        OutputTransform::Identity,
        5,
    );
    for l in &mut m.layers {
        let n = l.weight.as_slice().len();
        l.weight = F16Storage::Owned(vec![half::f16::from_f32(60000.0); n]);
        l.bias.iter_mut().for_each(|b| *b = 60000.0);
    }
    m
}

#[test]
fn every_bad_deploy_is_refused_naming_the_file_and_the_old_version_keeps_answering() {
    let dir = common::temp_dir("reload-refuse");
    deploy(&dir, &model("m", 1, 16, 1));
    deploy(&dir, &model("a", 1, 8, 2));
    let ens = "[ensembles.ens]\nmembers = [\"a\", \"m\"]\ncombiner = \"mean\"\n";
    std::fs::write(dir.join("ensembles.toml"), ens).unwrap();
    let h = start(&dir, |_| {});
    let admin = h.admin_addr.unwrap();
    let c = Client::connect(h.addr).unwrap();
    let v2 = dir.join("m").join("2");
    let weights = v2.join("weights.safetensors");
    let scratch = common::temp_dir("reload-refuse-scratch");
    let stage_weights = |m: &Model| {
        let _ = std::fs::remove_dir_all(scratch.join(&m.name));
        write_model(&scratch, m).unwrap();
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::copy(
            scratch
                .join(&m.name)
                .join(m.version.to_string())
                .join("weights.safetensors"),
            &weights,
        )
        .unwrap();
    };
    type Case<'a> = (&'a str, Box<dyn Fn() + 'a>, Vec<String>);
    let w = weights.display().to_string();
    let cases: Vec<Case> = vec![
        (
            "missing weights file",
            Box::new(|| std::fs::create_dir_all(&v2).unwrap()),
            vec![w.clone(), "No such file".into()],
        ),
        (
            "truncated weights file",
            Box::new(|| {
                stage_weights(&model("m", 2, 16, 7));
                let len = std::fs::metadata(&weights).unwrap().len();
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&weights)
                    .unwrap();
                f.set_len(len / 2).unwrap();
            }),
            vec![w.clone()],
        ),
        (
            "wrong shapes",
            Box::new(|| stage_weights(&model("m", 2, 24, 7))),
            vec![w.clone(), "shape".into()],
        ),
        (
            "NaN weights",
            Box::new(|| {
                let mut m = model("m", 2, 16, 7);
                let mut v = m.layers[0].weight.as_slice().to_vec();
                v[3] = half::f16::NAN;
                m.layers[0].weight = F16Storage::Owned(v);
                stage_weights(&m);
            }),
            vec![w.clone(), "element 3 is NaN".into()],
        ),
        (
            "ensemble naming a missing member",
            Box::new(|| {
                std::fs::write(
                    dir.join("ensembles.toml"),
                    format!("{ens}[ensembles.e2]\nmembers = [\"a\", \"nosuch\"]\n"),
                )
                .unwrap()
            }),
            vec!["ensembles.toml".into(), "nosuch".into()],
        ),
        (
            "failing warm-up",
            Box::new(|| deploy(&dir, &overflowing("boom"))),
            vec![
                dir.join("boom/1/weights.safetensors").display().to_string(),
                "warm-up".into(),
                "inf".into(),
            ],
        ),
    ];
    for (what, break_it, want) in &cases {
        break_it();
        let (code, v) = post(admin, "/v1/repository/reload");
        assert_eq!(code, 409, "{what}: {v}");
        let reasons = v["refused"].to_string();
        for w in want {
            assert!(
                reasons.contains(w.as_str()),
                "{what}: '{w}' not in {reasons}"
            );
        }
        assert_eq!(v["generation"], 1, "{what}: nothing applied");
        assert_eq!(ask(&c, "m", 1).unwrap(), [("m".to_string(), 1)], "{what}");
        assert!(ask(&c, "ens", 1).is_ok(), "{what}");
        // Repair: the broken pieces go away.
        let _ = std::fs::remove_dir_all(&v2);
        let _ = std::fs::remove_dir_all(dir.join("boom"));
        std::fs::write(dir.join("ensembles.toml"), ens).unwrap();
    }
    assert_eq!(
        common::metric(admin, "beast_registry_changes_total"),
        Some(cases.len() as f64)
    );
    let (code, models) = get(&admin.to_string(), "/v1/models", T).unwrap();
    assert_eq!(code, 200);
    assert!(models.contains("\"last_refusal\""), "{models}");
    // Once repaired, a reload applies nothing new and is not refused.
    let (code, v) = post(admin, "/v1/repository/reload");
    assert_eq!((code, v["generation"].as_u64()), (200, Some(1)), "{v}");
    // Unloading a member of an ensemble is refused too.
    let (code, v) = post(admin, "/v1/models/a/unload");
    assert_eq!(code, 409, "{v}");
    assert!(
        v["refused"].to_string().contains("unknown model \\\"a\\\""),
        "{v}"
    );
    h.shutdown();
}

#[test]
fn version_policy_latest_n_serves_the_newest_and_version_0_means_current() {
    let dir = common::temp_dir("reload-policy");
    for v in 1..=3 {
        deploy(&dir, &model("m", v, 16, v as u64));
    }
    let toml = dir.join("m").join("model.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(&toml, format!("versions = {{ latest = 2 }}\n{text}")).unwrap();
    let h = start(&dir, |_| {});
    let admin = h.admin_addr.unwrap();
    let (_, models) = get(&admin.to_string(), "/v1/models", T).unwrap();
    let v: serde_json::Value = serde_json::from_str(&models).unwrap();
    let versions: Vec<u64> = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [2, 3]);
    // Load v1 by hand, beyond the policy.
    let (code, v) = post(admin, "/v1/models/m/load?version=1");
    assert_eq!(code, 200, "{v}");
    assert!(v["loaded"][0].as_str().unwrap().starts_with("m v1"), "{v}");
    let c = Client::connect(h.addr).unwrap();
    let x = rows(1, 1, WIDTH);
    let mut s = spec("m", 1, WIDTH, &x);
    s.version = Some(1);
    assert_eq!(c.predict(&s).unwrap().runs[0].1, 1);
    s.version = Some(0);
    assert_eq!(c.predict(&s).unwrap().runs[0].1, 3);
    h.shutdown();
}

/// A `beast serve` child on a repository folder with `extra` config.
struct Child {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Child {
    fn spawn(dir: &Path, extra: &str) -> Child {
        let cfg = dir.join("beast.toml");
        std::fs::write(&cfg, format!("admin_listen = \"127.0.0.1:0\"\nlisten = \"127.0.0.1:0\"\ncores = [0]\n{extra}\n[cache]\nl2_path = \"\"\n")).unwrap();
        let models = dir.join("repo");
        let mut child = Command::new(env!("CARGO_BIN_EXE_beast"))
            .args([
                "serve",
                "--models",
                models.to_str().unwrap(),
                "--config",
                cfg.to_str().unwrap(),
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = common::stderr_lines(&mut child);
        Child {
            child,
            lines,
            log: Vec::new(),
        }
    }

    fn line_with(&mut self, needle: &str) -> String {
        let end = Instant::now() + T;
        loop {
            if let Some(l) = self.log.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            match self
                .lines
                .recv_timeout(end.saturating_duration_since(Instant::now()))
            {
                Ok(l) => self.log.push(l),
                Err(_) => {
                    let _ = self.child.kill();
                    panic!("no line with '{needle}': {:#?}", self.log)
                }
            }
        }
    }

    fn addr_after(&mut self, marker: &str) -> SocketAddr {
        let l = self.line_with(marker);
        let rest = l.split(marker).nth(1).unwrap();
        rest.split(|c: char| c.is_whitespace() || c == '/')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }
}

#[test]
fn sighup_picks_up_a_version_folder_renamed_into_place() {
    let dir = common::temp_dir("reload-sighup");
    let repo = dir.join("repo");
    deploy(&repo, &model("m", 1, 16, 1));
    let mut b = Child::spawn(&dir, "");
    let admin = b.addr_after("admin port on http://");
    let addr = b.addr_after("listening on ");
    let c = Client::connect(addr).unwrap();
    assert_eq!(ask(&c, "m", 1).unwrap()[0].1, 1);
    // A half-written version under a dot-name is not picked up.
    std::fs::create_dir_all(repo.join("m").join(".tmp-2")).unwrap();
    b.signal(libc::SIGHUP);
    b.line_with("SIGHUP: nothing changed");
    deploy(&repo, &model("m", 2, 16, 2));
    b.signal(libc::SIGHUP);
    let line = b.line_with("SIGHUP: generation 2 serving");
    assert!(line.contains("m v2"), "{line}");
    assert_eq!(ask(&c, "m", 1).unwrap()[0].1, 2);
    assert_eq!(
        common::metric(admin, "beast_registry_generation"),
        Some(2.0)
    );
    // The same from the command line: unload v1, then list.
    let beast = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_beast"))
            .args(["models"])
            .args(args)
            .args(["--admin", &admin.to_string()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (
            out.status.success(),
            text + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = beast(&["unload", "m", "--version", "1"]);
    assert!(ok && out.contains("\"m v1"), "{out}");
    let (ok, out) = beast(&["list"]);
    assert!(ok && out.contains("\"generation\": 3"), "{out}");
    let (ok, out) = beast(&["unload", "nosuch"]);
    assert!(
        !ok && out.contains("409") && out.contains("model nosuch: not loaded"),
        "{out}"
    );
    b.signal(libc::SIGINT);
    assert!(b.child.wait().unwrap().success());
}

#[test]
fn sigterm_with_drain_s_is_not_ready_at_once_and_still_serves_then_stops() {
    let dir = common::temp_dir("reload-drain");
    deploy(&dir.join("repo"), &model("m", 1, 16, 1));
    let mut b = Child::spawn(&dir, "drain_s = 3");
    let admin = b.addr_after("admin port on http://");
    let addr = b.addr_after("listening on ");
    let c = Client::connect(addr).unwrap();
    let readyz = || {
        get(&admin.to_string(), "/readyz", T)
            .map(|r| r.0)
            .unwrap_or(0)
    };
    wait_until(T, "ready", || readyz() == 200);
    let t0 = Instant::now();
    b.signal(libc::SIGTERM);
    b.line_with("SIGTERM: draining");
    assert_eq!(readyz(), 503);
    // Still served while draining (new connections too).
    assert!(ask(&c, "m", 1).is_ok());
    assert!(ask(&Client::connect(addr).unwrap(), "m", 2).is_ok());
    assert!(get(&admin.to_string(), "/readyz", T)
        .unwrap()
        .1
        .contains("draining"));
    assert!(b.child.wait().unwrap().success());
    assert!(
        t0.elapsed() >= Duration::from_secs(3),
        "stopped after the drain delay, not before"
    );
}

#[test]
fn post_drain_is_not_ready_at_once_and_stops_after_the_delay() {
    let dir = common::temp_dir("reload-post-drain");
    deploy(&dir, &model("m", 1, 16, 1));
    let h = start(&dir, |_| {});
    let admin = h.admin_addr.unwrap();
    let (code, v) = post(admin, "/v1/drain?seconds=3");
    assert_eq!(code, 200, "{v}");
    assert_eq!(get(&admin.to_string(), "/readyz", T).unwrap().0, 503);
    assert_eq!(common::metric(admin, "beast_draining"), Some(1.0));
    let c = Client::connect(h.addr).unwrap();
    assert!(ask(&c, "m", 1).is_ok());
    // The server stops on its own once the delay is over.
    let stop = h.stop_flag();
    wait_until(T, "stop after the drain", || stop.load(Ordering::Relaxed));
    h.wait();
}

#[test]
fn repository_poll_s_picks_up_a_new_version_on_its_own() {
    let dir = common::temp_dir("reload-poll");
    deploy(&dir, &model("m", 1, 16, 1));
    let h = start(&dir, |c| c.repository_poll_s = 0.1);
    let c = Client::connect(h.addr).unwrap();
    assert_eq!(ask(&c, "m", 1).unwrap()[0].1, 1);
    deploy(&dir, &model("m", 2, 16, 2));
    wait_until(T, "v2 answers after a poll", || {
        ask(&c, "m", 1).unwrap()[0].1 == 2
    });
    h.shutdown();
}
