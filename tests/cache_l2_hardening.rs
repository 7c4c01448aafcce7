//! The L2 file where the disk is full and where two servers start together
//! on one path: the server must never die of SIGBUS; it runs with L1 only,
//! says so in its log, /metrics, /v1/stats and /readyz.
//!
//! The full-disk tests mount a 1 MiB tmpfs under a 16 MiB L2 file. They run
//! as a child of this test binary inside a private mount namespace
//! (`unshare --mount`, plus a user namespace when not root), so nothing is
//! mounted on the host and the mount goes away with the child. Where
//! namespaces are not permitted they pass, printing "skipping: ...".

mod common;

use beast::cache::{inspect, L2Cache, L2Config};
use beast::server::admin;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

const BEAST: &str = env!("CARGO_BIN_EXE_beast");
const DIR_ENV: &str = "BEAST_L2_FULL_DISK_DIR";
const SKIP_MARK: &str = "skipping: cannot mount";
const L2_BYTES: u64 = 16 << 20;

fn cfg16() -> L2Config {
    L2Config {
        total_bytes: L2_BYTES,
        ways: 8,
        value_f32_max: 16,
    }
}

/// Run the ignored test `name` of this binary in a private mount namespace
/// with `DIR_ENV = dir`. None (after a visible "skipping" line) where this
/// machine does not allow one.
fn in_mount_namespace(name: &str, dir: &Path) -> Option<Output> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut ns = vec!["--mount", "--propagation", "private"];
    if !root {
        ns.splice(0..0, ["--user", "--map-root-user"]);
    }
    match Command::new("unshare").args(&ns).arg("true").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            println!(
                "skipping {name}: no private mount namespace (unshare {}: {})",
                ns.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return None;
        }
        Err(e) => {
            println!("skipping {name}: no private mount namespace (unshare: {e})");
            return None;
        }
    }
    let out = Command::new("unshare")
        .args(&ns)
        .arg(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", name, "--nocapture"])
        .args(["--test-threads=1"])
        .env(DIR_ENV, dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if let Some(line) = stdout.lines().find(|l| l.contains(SKIP_MARK)) {
        println!("skipping {name}: {line}");
        return None;
    }
    assert!(
        out.status.success(),
        "{name} in a mount namespace: {:?}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 passed"), "{stdout}");
    print!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    Some(out)
}

/// In the child: a 1 MiB tmpfs on `DIR_ENV`, or None (and the skip mark).
fn mount_small_tmpfs() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var(DIR_ENV).ok()?);
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let target = c(dir.to_str().unwrap());
    let (src, fstype, opts) = (c("tmpfs"), c("tmpfs"), c("size=1m"));
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            opts.as_ptr().cast(),
        )
    };
    if rc != 0 {
        println!("{SKIP_MARK} a tmpfs: {}", std::io::Error::last_os_error());
        return None;
    }
    Some(dir)
}

fn mount_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("beast-l2-full-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A valid 16 MiB cache file that is sparse: a header and holes, as the old
/// `set_len` left it (and as a copy with `cp --sparse` may leave it).
fn sparse_valid_file(at: &Path) {
    let donor = std::env::temp_dir().join(format!("beast-l2-donor-{}", std::process::id()));
    let _ = std::fs::remove_file(&donor);
    let (c, _) = L2Cache::open(&donor, cfg16()).unwrap();
    drop(c);
    let bytes = std::fs::read(&donor).unwrap();
    let _ = std::fs::remove_file(&donor);
    std::fs::write(at, &bytes[..4096]).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(at).unwrap();
    f.set_len(L2_BYTES).unwrap();
}

#[test]
#[ignore = "run by l2_on_a_full_disk_is_refused_not_fatal in a mount namespace"]
fn full_disk_library_child() {
    let Some(dir) = mount_small_tmpfs() else {
        return;
    };
    // A new file bigger than the disk: refused at open with the reason and
    // no file left behind (the old code mapped a sparse file and died of
    // SIGBUS at the first write into an unbacked page).
    let p = dir.join("new.cache");
    match L2Cache::open(&p, cfg16()) {
        Ok((c, _)) => {
            let geo = c.geometry();
            for i in 0..geo.slots() {
                let k = beast::cache::KeyBuilder::new("t")
                    .input(&i.to_le_bytes())
                    .finish();
                c.insert(&k, 1, &[1.0], 0);
            }
            panic!("a 16 MiB L2 file on a 1 MiB disk was accepted");
        }
        Err(e) => {
            println!("new file: {e}");
            assert!(e.contains(&p.display().to_string()), "names the file: {e}");
            assert!(e.contains("space"), "says why: {e}");
        }
    }
    assert!(!p.exists(), "the refused file is removed");

    // An existing, valid but sparse file (a restart): refused before the
    // open-time scan touches the mapping, and left as it was.
    let p = dir.join("sparse.cache");
    sparse_valid_file(&p);
    let e = L2Cache::open(&p, cfg16()).err().expect("refused");
    println!("sparse file: {e}");
    assert!(e.contains("space"), "{e}");
    assert_eq!(std::fs::metadata(&p).unwrap().len(), L2_BYTES, "kept");

    // `beast cache inspect` reads it without mapping it.
    let text = inspect(&p).expect("inspect a sparse file");
    assert!(text.contains("live           0 "), "{text}");
    let out = Command::new(BEAST)
        .args(["cache", "inspect"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "beast cache inspect: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("slots"));
}

#[test]
fn l2_on_a_full_disk_is_refused_not_fatal() {
    let dir = mount_dir("lib");
    in_mount_namespace("full_disk_library_child", &dir);
    let _ = std::fs::remove_dir_all(&dir);
}

fn get(addr: &str, path: &str) -> (u16, String) {
    admin::request("GET", addr, path, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// The value of an unlabelled sample in Prometheus text.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
#[ignore = "run by a_server_on_a_full_disk_serves_with_l1_only in a mount namespace"]
fn full_disk_server_child() {
    let Some(dir) = mount_small_tmpfs() else {
        return;
    };
    let mut cfg = test_config();
    cfg.cache.l2_path = dir.join("server.cache");
    cfg.cache.l2_bytes = L2_BYTES;
    let server = start_with(cfg, test_repository(300_000));
    let client = beast::client::Client::connect(server.addr).unwrap();
    // Enough distinct answers to touch every page of a 16 MiB file.
    for i in 0..3000 {
        let x = rows(10_000 + i, 1, WIDTH);
        let p = client.predict(&spec("a", 1, WIDTH, &x)).unwrap();
        assert_eq!(p.outputs.len(), CLASSES);
    }
    let x = rows(10_000, 1, WIDTH);
    assert!(
        client.predict(&spec("a", 1, WIDTH, &x)).unwrap().cached,
        "L1 still serves"
    );
    let a = server.admin_addr.unwrap().to_string();
    let (code, text) = get(&a, "/metrics");
    assert_eq!(code, 200);
    assert_eq!(metric(&text, "beast_cache_l2_enabled"), Some(0), "{text}");
    let (code, why) = get(&a, "/readyz");
    assert_eq!(code, 503, "{why}");
    assert!(
        why.contains("l2 cache disabled") && why.contains("space"),
        "{why}"
    );
    let (_, stats) = get(&a, "/v1/stats");
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(v["cache_l2"]["enabled"], false, "{stats}");
    assert!(
        v["cache_l2"]["reason"].as_str().unwrap().contains("space"),
        "{stats}"
    );
    server.shutdown();
}

#[test]
fn a_server_on_a_full_disk_serves_with_l1_only() {
    let dir = mount_dir("server");
    in_mount_namespace("full_disk_server_child", &dir);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `beast serve` with the shipped models and `l2` as its L2 file.
struct Serve {
    child: Child,
    addr: String,
    admin: String,
    log: Receiver<String>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        // A failed assertion must not leave a server holding our stdout.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Start `beast serve` (not yet waited for).
fn spawn_serve(dir: &Path, l2: &Path, n: usize) -> Serve {
    let cfg = dir.join(format!("beast-{n}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "admin_listen = \"127.0.0.1:0\"\n[cache]\nl2_path = \"{}\"\nl2_bytes = {L2_BYTES}\n",
            l2.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(BEAST)
        .args(["serve", "--listen", "127.0.0.1:0", "--cores", "0"])
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = common::stderr_lines(&mut child);
    Serve {
        child,
        addr: String::new(),
        admin: String::new(),
        log: rx,
    }
}

/// Wait for the server's "listening on" and admin-port lines.
fn wait_listening(s: &mut Serve) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut log = Vec::new();
    while s.addr.is_empty() || s.admin.is_empty() {
        let Ok(line) = s
            .log
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        else {
            panic!("beast serve did not start: {log:#?}");
        };
        if let Some(rest) = line.split("listening on ").nth(1) {
            s.addr = rest.split_whitespace().next().unwrap().to_string();
        }
        if let Some(rest) = line.split("admin port on http://").nth(1) {
            s.admin = rest.split_whitespace().next().unwrap().to_string();
        }
        log.push(line);
    }
}

#[test]
fn two_servers_starting_together_on_a_new_l2_path() {
    let dir = common::temp_dir("l2-pair");
    for round in 0..3 {
        let l2 = dir.join(format!("l2-{round}.cache"));
        // Started at once: both race to create the same new file.
        let mut servers = [spawn_serve(&dir, &l2, 0), spawn_serve(&dir, &l2, 1)];
        for s in &mut servers {
            wait_listening(s);
        }
        let enabled: Vec<u64> = servers
            .iter()
            .map(|s| metric(&get(&s.admin, "/metrics").1, "beast_cache_l2_enabled").unwrap())
            .collect();
        assert_eq!(enabled.iter().sum::<u64>(), 1, "round {round}: one owner");
        let (mut owner, mut other) = {
            let [x, y] = servers;
            if enabled[0] == 1 {
                (x, y)
            } else {
                (y, x)
            }
        };
        let (code, why) = get(&other.admin, "/readyz");
        assert_eq!(code, 503, "round {round}: {why}");
        assert!(
            why.contains("l2 cache disabled") && why.contains("locked"),
            "{why}"
        );
        // The owner writes all over its file: a truncated file would kill it.
        let client = beast::client::Client::connect(&owner.addr).unwrap();
        for i in 0..2000 {
            let x = rows(round * 100_000 + i, 1, 64);
            client.predict(&spec("digits_small", 1, 64, &x)).unwrap();
        }
        let text = get(&owner.admin, "/metrics").1;
        assert!(metric(&text, "beast_cache_l2_entries").unwrap() > 1000);
        assert_eq!(get(&owner.admin, "/readyz").0, 200);
        assert_eq!(std::fs::metadata(&l2).unwrap().len(), L2_BYTES);
        for s in [&mut owner, &mut other] {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
            let st = s.child.wait().unwrap();
            let log: Vec<String> = s.log.try_iter().collect();
            assert!(st.success(), "round {round}: exited {st}: {log:#?}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
