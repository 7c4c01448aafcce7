//! Helpers shared by the integration tests: a real server on an ephemeral
//! port with small seeded models, and raw-socket frame helpers.
#![allow(dead_code)]

use beast::config::Config;
use beast::model::load::Repository;
use beast::model::{Activation, BatchLimits, Combiner, EnsembleSpec, Model, OutputTransform};
use beast::server::ServerHandle;
use beast::wire::{self, CacheControl, Encoder, Input, RequestSpec, ResponseView};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

pub const WIDTH: usize = 12;
pub const CLASSES: usize = 5;

/// Three small members of different shapes and an ensemble `ens` of them,
/// plus `slow` (waits for a full batch, up to `delay_us_slow`: requests sit
/// in its queue, for shutdown and overload tests) and `m` v1 + v2.
pub fn test_models(delay_us_slow: u64) -> Vec<Model> {
    let mk = |name: &str, dims: &[usize], seed: u64| {
        let mut m = Model::random(name, dims, Activation::Relu, OutputTransform::Softmax, seed);
        m.batch = BatchLimits {
            max_batch: 16,
            min_batch: 1,
            max_queue_delay_us: 50,
            queue_rows_max: 4096,
        };
        m
    };
    let mut slow = mk("slow", &[WIDTH, 8, CLASSES], 7);
    slow.batch.max_queue_delay_us = delay_us_slow;
    slow.batch.max_batch = 1024;
    // Waits for a full batch: a request sits in the queue for the delay.
    slow.batch.min_batch = 1024;
    let mut m2 = mk("m", &[WIDTH, 24, CLASSES], 22);
    m2.version = 2;
    vec![
        mk("a", &[WIDTH, 16, CLASSES], 1),
        mk("b", &[WIDTH, 32, 16, CLASSES], 2),
        mk("c", &[WIDTH, 8, CLASSES], 3),
        slow,
        mk("m", &[WIDTH, 24, CLASSES], 21),
        m2,
    ]
}

pub fn test_repository(delay_us_slow: u64) -> Repository {
    let mut repo = Repository::default();
    for m in test_models(delay_us_slow) {
        repo.models
            .entry(m.name.clone())
            .or_default()
            .push(Arc::new(m));
    }
    repo.ensembles.insert(
        "ens".into(),
        EnsembleSpec {
            name: "ens".into(),
            members: vec!["a".into(), "b".into(), "c".into()],
            combiner: Combiner::Mean,
            weights: vec![],
            selection: Default::default(),
        },
    );
    repo.ensembles.insert(
        "wens".into(),
        EnsembleSpec {
            name: "wens".into(),
            members: vec!["a".into(), "c".into()],
            combiner: Combiner::WeightedMean,
            weights: vec![1.0, 3.0],
            selection: Default::default(),
        },
    );
    repo
}

pub fn test_config() -> Config {
    let mut c = Config {
        listen: "127.0.0.1:0".into(),
        cores: vec![0],
        pin_shards: false,
        shutdown_grace_ms: 5000,
        // An ephemeral admin port: tests run servers in parallel.
        admin_listen: "127.0.0.1:0".into(),
        ..Config::default()
    };
    // Tests run many servers at once: no shared L2 file unless a test asks.
    c.cache.l2_path = "".into();
    c
}

/// A fresh, empty folder under the system temp dir.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("beast-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn start_server() -> ServerHandle {
    start_with(test_config(), test_repository(300_000))
}

pub fn start_with(cfg: Config, repo: Repository) -> ServerHandle {
    beast::server::start(cfg, Arc::new(repo)).expect("server starts")
}

/// Deterministic input rows.
pub fn rows(seed: u64, n: usize, width: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n * width)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub fn spec<'a>(target: &'a str, rows: usize, width: usize, data: &'a [f32]) -> RequestSpec<'a> {
    RequestSpec {
        target,
        version: None,
        rows: rows as u32,
        cols: width as u32,
        input: Input::F32(data),
        deadline_us: None,
        domain: None,
        cache: CacheControl::Use,
        policy: beast::wire::PolicyOverride::Default,
    }
}

/// A raw connection that speaks frames by hand.
pub struct Raw {
    pub s: TcpStream,
    enc: Encoder,
}

impl Raw {
    pub fn connect(addr: std::net::SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        Raw {
            s,
            enc: Encoder::new(),
        }
    }

    pub fn from_stream(s: TcpStream) -> Raw {
        Raw {
            s,
            enc: Encoder::new(),
        }
    }

    pub fn send(&mut self, id: u64, r: &RequestSpec<'_>) {
        let mut buf = Vec::new();
        self.enc.request(id, r, &mut buf);
        self.s.write_all(&buf).unwrap();
    }

    pub fn send_bytes(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Next response body, or None when the server closed the connection.
    pub fn recv_body(&mut self) -> Option<Vec<u8>> {
        let mut len = [0u8; 4];
        match self.s.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("read: {e}"),
        }
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        self.s.read_exact(&mut body).unwrap();
        Some(body)
    }

    pub fn recv(&mut self) -> Owned {
        let body = self
            .recv_body()
            .expect("a response, not a closed connection");
        Owned::from(&body)
    }

    /// True when the server has closed this connection (EOF within the timeout).
    pub fn is_closed(&mut self) -> bool {
        self.recv_body().is_none()
    }
}

/// An owned copy of a decoded response.
#[derive(Debug, Clone)]
pub struct Owned {
    pub id: u64,
    pub status: wire::Status,
    pub message: String,
    pub rows: u32,
    pub cols: u32,
    pub output: Vec<f32>,
    pub runs: Vec<(String, u32, u64)>,
}

impl From<&Vec<u8>> for Owned {
    fn from(body: &Vec<u8>) -> Owned {
        let v: ResponseView<'_> =
            wire::decode_response(body).expect("server sends valid responses");
        Owned {
            id: v.id,
            status: v.status,
            message: v.message.to_string(),
            rows: v.rows,
            cols: v.cols,
            output: v.output_f32(),
            runs: v
                .runs
                .iter()
                .map(|(m, ver, f)| (m.to_string(), *ver, *f))
                .collect(),
        }
    }
}

/// Run a model directly on the CPU backend.
pub fn direct(model: &Model, input: &[f32], rows: usize) -> Vec<f32> {
    use beast::backend::Backend;
    let mut b = beast::backend::cpu::CpuBackend::new();
    let mut out = vec![0.0; rows * model.output_width];
    b.run(model, input, rows, &mut out).unwrap();
    out
}

pub fn model(name: &str) -> Model {
    test_models(300_000)
        .into_iter()
        .find(|m| m.name == name && m.version == 1)
        .unwrap()
}

pub fn assert_close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "element {i}: {x} vs {y} (tol {tol})");
    }
}

/// Poll `cond` every few milliseconds until it holds; panic naming `what`
/// when it still does not after `within`. Tests wait on a condition, never
/// on a sleep.
pub fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    loop {
        if cond() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The sum of every series of the Prometheus metric `name` on the admin
/// port at `admin` (all label sets), or `None` when it is not exposed.
pub fn metric(admin: std::net::SocketAddr, name: &str) -> Option<f64> {
    let (code, text) =
        beast::server::admin::get(&admin.to_string(), "/metrics", Duration::from_secs(5)).ok()?;
    if code != 200 {
        return None;
    }
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let v: f64 = rest.rsplit(' ').next()?.parse().ok()?;
        sum = Some(sum.unwrap_or(0.0) + v);
    }
    sum
}

/// The server's side of the connection `client` has read everything the
/// client sent (its receive queue in /proc/net/tcp is empty). Lets a test
/// wait until bytes were really taken by the server, not just sent.
pub fn server_has_read(client: &TcpStream) -> bool {
    let (me, peer) = (client.local_addr().unwrap(), client.peer_addr().unwrap());
    let hex = |a: std::net::SocketAddr| match a {
        std::net::SocketAddr::V4(v4) => {
            format!(
                "{:08X}:{:04X}",
                u32::from_le_bytes(v4.ip().octets()),
                v4.port()
            )
        }
        std::net::SocketAddr::V6(_) => panic!("server_has_read: IPv4 only"),
    };
    let (server_side, client_side) = (hex(peer), hex(me));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    // (tx_queue, rx_queue) of the socket local → remote.
    let queues = |local: &str, remote: &str| {
        table.lines().skip(1).find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() > 4 && f[1] == local && f[2] == remote).then(|| {
                let (tx, rx) = f[4].split_once(':').unwrap();
                (
                    u64::from_str_radix(tx, 16).unwrap(),
                    u64::from_str_radix(rx, 16).unwrap(),
                )
            })
        })
    };
    // Nothing unacknowledged on our side (it all reached the server's
    // socket) and nothing unread on the server's.
    matches!(queues(&client_side, &server_side), Some((0, _)))
        && matches!(queues(&server_side, &client_side), Some((_, 0)))
}

/// Forward a child's stderr, line by line, to a channel (read on a thread of
/// its own, so a test can wait for a log line with a deadline).
pub fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `promtool check metrics` finds nothing to say; `false` (after a
/// `SKIPPED:` line) when promtool is not installed.
pub fn promtool_accepts(text: &str) -> bool {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("SKIPPED: promtool is not on PATH, so the exposition was not checked");
        return false;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool: {report}\n---\n{text}"
    );
    true
}

/// The number at `path` in a JSON value (beast-bench's `--json` line),
/// panicking with the whole value when it is absent.
pub fn json_num(j: &serde_json::Value, path: &[&str]) -> f64 {
    let mut v = j;
    for k in path {
        v = &v[*k];
    }
    v.as_f64()
        .unwrap_or_else(|| panic!("no {} in {j}", path.join(".")))
}

/// Runs `f` (which sets up its own fresh server) up to three times: an
/// `Err(why)` voids a try — a precondition or a time bound that a stall of
/// a loaded test machine broke. A real bug fails every try; all three
/// failing panics with each try's reason.
pub fn within_three_tries(what: &str, mut f: impl FnMut() -> Result<(), String>) {
    let mut why = Vec::new();
    for k in 1..=3 {
        match f() {
            Ok(()) => return,
            Err(e) => {
                eprintln!("{what}: try {k} void: {e}");
                why.push(e);
            }
        }
    }
    panic!("{what}: three tries failed: {why:?}");
}
