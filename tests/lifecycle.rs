//! Start, stop and restart of the real `beast` binary: a restart binds the
//! same port at once after a graceful stop or a crash with clients
//! connected; SIGTERM during start-up exits 0; the admin port answers
//! during the slow start-up steps; /readyz names why it is not ready.

mod common;

use beast::model::{Activation, BatchLimits, Model, OutputTransform};
use beast::server::admin::get;
use common::{rows, spec, Raw};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

const BEAST: &str = env!("CARGO_BIN_EXE_beast");
const WIDTH: usize = 12;
/// Longest a start-up or a stop may take on a loaded test machine.
const DEADLINE: Duration = Duration::from_secs(60);

/// A `beast serve` child and the lines of its stderr.
struct Beast {
    child: Child,
    lines: Receiver<String>,
    log: Vec<String>,
}

impl Beast {
    fn spawn(args: &[&str]) -> Beast {
        Beast::spawn_env(args, &[])
    }

    fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> Beast {
        let mut child = Command::new(BEAST)
            .arg("serve")
            .args(args)
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let rx = common::stderr_lines(&mut child);
        Beast {
            child,
            lines: rx,
            log: Vec::new(),
        }
    }

    /// The first log line containing `needle`, waiting up to `DEADLINE`;
    /// `None` when the process closed its stderr (exited) first.
    fn line_with(&mut self, needle: &str) -> Option<String> {
        if let Some(l) = self.log.iter().find(|l| l.contains(needle)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.log.push(line.clone());
                    if hit {
                        return Some(line);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {
                    self.kill();
                    panic!(
                        "no log line with '{needle}' in {DEADLINE:?}; log: {:#?}",
                        self.log
                    )
                }
            }
        }
    }

    /// The address logged after `marker` ("listening on ", "admin port on http://").
    fn addr_after(&mut self, marker: &str) -> SocketAddr {
        let Some(line) = self.line_with(marker) else {
            let status = self.wait();
            panic!(
                "beast exited ({status}) before logging '{marker}'; log: {:#?}",
                self.log
            );
        };
        let rest = line.split(marker).nth(1).unwrap();
        rest.split(|c: char| c.is_whitespace() || c == '/')
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    fn listening(&mut self) -> SocketAddr {
        self.addr_after("listening on ")
    }

    fn admin(&mut self) -> SocketAddr {
        self.addr_after("admin port on http://")
    }

    fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Wait (bounded) for the process to exit; drains the rest of its log.
    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.log.extend(self.lines.try_iter());
                // The reader thread may still hold lines written just before exit.
                while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
                    self.log.push(l);
                }
                return status;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!("beast did not exit; log: {:#?}", self.log);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Beast {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill();
        }
    }
}

/// A repository with `slow` (answers after 300 ms of batching delay, so
/// requests are in flight when a stop comes) and `fast`.
fn slow_repository(dir: &Path) -> PathBuf {
    let models = dir.join("models");
    // `slow` waits for a full batch: its requests sit in the queue 300 ms.
    for (name, min_batch, delay_us, seed) in [("slow", 1024, 300_000, 7), ("fast", 1, 50, 8)] {
        let mut m = Model::random(
            name,
            &[WIDTH, 8, 5],
            Activation::Relu,
            OutputTransform::Softmax,
            seed,
        );
        m.batch = BatchLimits {
            max_batch: 1024,
            min_batch,
            max_queue_delay_us: delay_us,
            queue_rows_max: 4096,
        };
        beast::model::demo::write_model(&models, &m).unwrap();
    }
    models
}

/// A config file: ephemeral admin port, no L2 unless `extra` sets one.
fn config(dir: &Path, extra: &str) -> PathBuf {
    let p = dir.join("beast.toml");
    std::fs::write(
        &p,
        format!("admin_listen = \"127.0.0.1:0\"\nshutdown_grace_ms = 3000\n{extra}\n[cache]\nl2_path = \"\"\n"),
    )
    .unwrap();
    p
}

fn serve_args<'a>(listen: &'a str, models: &'a Path, cfg: &'a Path) -> Vec<&'a str> {
    vec![
        "--listen",
        listen,
        "--cores",
        "0",
        "--models",
        models.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]
}

/// Clients with requests in flight on `slow`, plus idle connected ones.
fn connect_clients(addr: SocketAddr) -> Vec<Raw> {
    let x = rows(1, 1, WIDTH);
    let mut clients = Vec::new();
    for i in 0..8 {
        let mut c = Raw::connect(addr);
        if i % 2 == 0 {
            c.send(i as u64, &spec("slow", 1, WIDTH, &x));
        }
        clients.push(c);
    }
    clients
}

/// Start on an ephemeral port, connect clients, stop with `sig`, and
/// restart on the same port at once: it must bind.
fn restart_after(sig: i32, name: &str) {
    let dir = common::temp_dir(name);
    let models = slow_repository(&dir);
    let cfg = config(&dir, "");
    let mut first = Beast::spawn(&serve_args("127.0.0.1:0", &models, &cfg));
    let addr = first.listening();
    let mut clients = connect_clients(addr);
    // The fast model answers, so every connection has been accepted and
    // the slow requests are queued behind their batching delay.
    let x = rows(2, 1, WIDTH);
    clients[1].send(99, &spec("fast", 1, WIDTH, &x));
    assert_eq!(clients[1].recv().id, 99);
    first.signal(sig);
    let status = first.wait();
    if sig == libc::SIGTERM {
        assert!(status.success(), "{status}; log: {:#?}", first.log);
    }
    // Half the clients read the close and go away (the server's side is
    // left in TIME_WAIT); the other half stay connected (FIN_WAIT2).
    for c in clients.iter_mut().step_by(2) {
        while c.recv_body().is_some() {}
    }
    let kept: Vec<Raw> = clients.into_iter().skip(1).step_by(2).collect();
    let listen = addr.to_string();
    let mut second = Beast::spawn(&serve_args(&listen, &models, &cfg));
    let Some(_) = second.line_with("listening on ") else {
        let status = second.wait();
        panic!(
            "restart on {listen} after {name} did not bind ({status}); log: {:#?}",
            second.log
        );
    };
    let client = beast::client::Client::connect(addr).unwrap();
    assert_eq!(client.predict(&spec("fast", 1, WIDTH, &x)).unwrap().rows, 1);
    drop(kept);
    second.signal(libc::SIGTERM);
    assert!(second.wait().success(), "{:#?}", second.log);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_restart_after_sigterm_with_clients_connected_binds_at_once() {
    restart_after(libc::SIGTERM, "restart-term");
}

#[test]
fn a_restart_after_kill_9_with_requests_in_flight_binds_at_once() {
    restart_after(libc::SIGKILL, "restart-kill");
}

/// A shard stuck in its stop (the test hook blocks its thread, as a
/// syscall that never returns would) is reported by name and the process
/// exits 1, instead of hanging after SIGTERM.
#[test]
fn a_stop_that_stalls_is_logged_with_what_it_waits_on_and_exits_1() {
    let dir = common::temp_dir("stop-stall");
    let models = slow_repository(&dir);
    let cfg = config(&dir, "");
    std::fs::write(
        &cfg,
        "admin_listen = \"127.0.0.1:0\"\nshutdown_grace_ms = 100\n[cache]\nl2_path = \"\"\n",
    )
    .unwrap();
    let mut b = Beast::spawn_env(
        &serve_args("127.0.0.1:0", &models, &cfg),
        &[("BEAST_TEST_STALL_STOP", "1")],
    );
    let addr = b.listening();
    let _client = Raw::connect(addr);
    let started = Instant::now();
    b.signal(libc::SIGTERM);
    let status = b.wait();
    assert_eq!(status.code(), Some(1), "{status}; log: {:#?}", b.log);
    assert!(
        b.log
            .iter()
            .any(|l| l.contains("stop stalled for") && l.contains("shard 0: draining connections")),
        "{:#?}",
        b.log
    );
    // Reported 10 s past shutdown_grace_ms, not at once.
    assert!(
        started.elapsed() >= Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_port_held_by_another_live_server_is_still_refused() {
    let dir = common::temp_dir("restart-busy");
    let models = slow_repository(&dir);
    let cfg = config(&dir, "");
    let mut first = Beast::spawn(&serve_args("127.0.0.1:0", &models, &cfg));
    let addr = first.listening();
    let listen = addr.to_string();
    let mut second = Beast::spawn(&serve_args(&listen, &models, &cfg));
    let status = second.wait();
    assert!(!status.success(), "{:#?}", second.log);
    assert!(
        second
            .log
            .iter()
            .any(|l| l.contains(&listen) && l.contains("in use")),
        "{:#?}",
        second.log
    );
    // The first server still has the port to itself.
    assert!(TcpStream::connect(addr).is_ok());
    first.signal(libc::SIGTERM);
    assert!(first.wait().success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A port nothing listens on now (bound once, then let go).
fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn fetch(admin: SocketAddr, path: &str) -> (u16, String) {
    get(&admin.to_string(), path, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Poll `/readyz` until its body contains `want` (deadline-bounded).
fn readyz_until(admin: SocketAddr, want: &str) -> (u16, String) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let r = fetch(admin, "/readyz");
        if r.1.contains(want) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never said '{want}'; last: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The slow repository plus an ensemble calibrated at start-up from
/// `cal.csv`, which is a FIFO: calibration blocks until the test writes the
/// rows, so start-up is held in "calibrating cascades" for as long as needed.
fn repository_held_at_calibration(dir: &Path) -> (PathBuf, PathBuf) {
    let models = slow_repository(dir);
    std::fs::write(
        models.join("ensembles.toml"),
        "[ensembles.casc]\nmembers = [\"fast\", \"slow\"]\npolicy = \"cascade\"\n\
         cascade_target_agreement = 0.9\ncalibration = \"cal.csv\"\n",
    )
    .unwrap();
    let fifo = models.join("cal.csv");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    (models, fifo)
}

/// Calibration rows for `repository_held_at_calibration`.
fn calibration_csv() -> String {
    let header: Vec<String> = (0..WIDTH).map(|i| format!("x{i}")).collect();
    let mut text = header.join(",") + "\n";
    for r in 0..16 {
        let row: Vec<String> = rows(r, 1, WIDTH).iter().map(|v| v.to_string()).collect();
        text += &(row.join(",") + "\n");
    }
    text
}

#[test]
fn during_cascade_calibration_the_admin_port_answers_and_sigterm_exits_0() {
    let dir = common::temp_dir("startup-load");
    let (models, fifo) = repository_held_at_calibration(&dir);
    let cfg = config(&dir, "");
    let listen = free_port();
    let mut b = Beast::spawn(&serve_args(&listen, &models, &cfg));
    let admin = b.admin();
    // Start-up is held reading the calibration FIFO.
    assert_eq!(fetch(admin, "/healthz"), (200, "ok\n".to_string()));
    let (code, body) = readyz_until(admin, "starting: calibrating cascades");
    assert_eq!(code, 503);
    assert!(body.contains("calibrating cascades"), "{body}");
    assert_eq!(fetch(admin, "/v1/models").0, 503);
    let (code, metrics) = fetch(admin, "/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("\nbeast_ready 0\n"), "{metrics}");
    assert!(
        TcpStream::connect(&listen).is_err(),
        "nothing listens on the main port during start-up"
    );
    b.signal(libc::SIGTERM);
    let status = b.wait();
    assert!(status.success(), "{status}; log: {:#?}", b.log);
    assert!(
        b.log.iter().any(|l| l.contains("SIGTERM during start-up")),
        "{:#?}",
        b.log
    );
    assert!(!b.log.iter().any(|l| l.contains("listening on")));
    drop(fifo);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn once_start_up_is_done_the_server_is_ready() {
    let dir = common::temp_dir("startup-done");
    let (models, fifo) = repository_held_at_calibration(&dir);
    let cfg = config(&dir, "");
    let listen = free_port();
    let mut b = Beast::spawn(&serve_args(&listen, &models, &cfg));
    let admin = b.admin();
    readyz_until(admin, "calibrating cascades");
    // Let start-up go on: write the calibration rows into the FIFO.
    std::fs::write(&fifo, calibration_csv()).unwrap();
    assert_eq!(readyz_until(admin, "ready"), (200, "ready\n".to_string()));
    assert_eq!(b.listening().to_string(), listen);
    let client = beast::client::Client::connect(&listen).unwrap();
    let x = rows(5, 1, WIDTH);
    assert_eq!(client.predict(&spec("casc", 1, WIDTH, &x)).unwrap().rows, 1);
    let metrics = fetch(admin, "/metrics").1;
    assert!(metrics.contains("\nbeast_ready 1\n"), "{metrics}");
    b.signal(libc::SIGTERM);
    assert!(b.wait().success());
    assert!(
        b.log.iter().any(|l| l.contains("stopped after")),
        "{:#?}",
        b.log
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn during_the_l2_open_scan_the_admin_port_answers_and_sigterm_exits_0() {
    let dir = common::temp_dir("startup-l2");
    let models = slow_repository(&dir);
    let l2 = dir.join("l2.cache");
    // A large L2 file: reopening it scans every slot (2 GiB: about a
    // second) before serving. The file is sparse: no disk is used.
    let cfg = dir.join("l2.toml");
    std::fs::write(
        &cfg,
        format!(
            "admin_listen = \"127.0.0.1:0\"\n[cache]\nl2_path = \"{}\"\nl2_bytes = {}\n",
            l2.display(),
            2u64 << 30
        ),
    )
    .unwrap();
    // The first run creates the file (sparse: fast).
    let mut first = Beast::spawn(&serve_args("127.0.0.1:0", &models, &cfg));
    first.listening();
    first.signal(libc::SIGTERM);
    assert!(first.wait().success(), "{:#?}", first.log);

    let listen = free_port();
    let mut b = Beast::spawn(&serve_args(&listen, &models, &cfg));
    let admin = b.admin();
    const STEP: &str = "opening the L2 cache";
    loop {
        let (code, body) = readyz_until(admin, STEP);
        assert_eq!(code, 503, "{body}");
        let healthz = fetch(admin, "/healthz").0;
        let refused = TcpStream::connect(&listen).is_err();
        // Still in the scan afterwards: both answers were given during it.
        if fetch(admin, "/readyz").1.contains(STEP) {
            assert_eq!(healthz, 200);
            assert!(
                refused,
                "nothing listens on the main port during the L2 scan"
            );
            break;
        }
    }
    b.signal(libc::SIGTERM);
    let status = b.wait();
    assert!(status.success(), "{status}; log: {:#?}", b.log);
    assert!(
        b.log.iter().any(|l| l.contains("SIGTERM during start-up")),
        "{:#?}",
        b.log
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_refused_model_or_ensemble_keeps_the_server_not_ready_unless_allowed() {
    let dir = common::temp_dir("refused");
    let models = slow_repository(&dir);
    std::fs::create_dir_all(models.join("broken/1")).unwrap();
    std::fs::write(
        models.join("broken/model.toml"),
        "input_width = 4\noutput = \"softmax\"\nlayers = [{ units = 2, activation = \"relux\" }]\n",
    )
    .unwrap();
    std::fs::write(
        models.join("ensembles.toml"),
        "[ensembles.ok]\nmembers = [\"fast\", \"slow\"]\n[ensembles.bad]\nmembers = [\"fast\", \"nope\"]\n",
    )
    .unwrap();
    for allowed in [false, true] {
        let repo = beast::model::load::load_repository(&models, &BatchLimits::default()).unwrap();
        let mut cfg = common::test_config();
        cfg.ready_with_refused = allowed;
        let server = common::start_with(cfg, repo);
        let admin = server.admin_addr.unwrap();
        let (code, body) = fetch(admin, "/readyz");
        if allowed {
            assert_eq!((code, body.as_str()), (200, "ready\n"));
        } else {
            assert_eq!(code, 503, "{body}");
            assert!(
                body.starts_with("refused at load: 1 model(s), 1 ensemble(s)"),
                "{body}"
            );
            assert!(body.contains("broken/model.toml"), "{body}");
            assert!(body.contains("ensembles.bad"), "{body}");
        }
        let metrics = fetch(admin, "/metrics").1;
        for line in [
            "beast_models_refused 1",
            "beast_ensembles_refused 1",
            if allowed {
                "beast_ready 1"
            } else {
                "beast_ready 0"
            },
        ] {
            assert!(
                metrics.contains(&format!("\n{line}\n")),
                "{line}: {metrics}"
            );
        }
        // What loaded is served either way.
        let client = beast::client::Client::connect(server.addr).unwrap();
        let x = rows(4, 1, WIDTH);
        assert_eq!(client.predict(&spec("ok", 1, WIDTH, &x)).unwrap().rows, 1);
        server.shutdown();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
