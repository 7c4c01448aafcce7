//! The cluster client against fake nodes on port 0 whose behaviour a test
//! sets (and changes) per node: answer, OVERLOADED, close, or hold.

use super::*;
use crate::wire::{
    decode_request, Encoder, FrameReader, ResponseHeader, Status, Timings, MAX_FRAME_BYTES_DEFAULT,
};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicU8;

const OK: u8 = 0;
const BUSY: u8 = 1;
const DIE: u8 = 2;
const HOLD: u8 = 3;

struct Fake {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    seen: Arc<AtomicU64>,
}

impl Fake {
    fn start(mode: u8) -> Fake {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(mode));
        let seen = Arc::new(AtomicU64::new(0));
        let (m, s) = (mode.clone(), seen.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { return };
                let (m, s) = (m.clone(), s.clone());
                std::thread::spawn(move || serve(c, &m, &s));
            }
        });
        Fake { addr, mode, seen }
    }
    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
    fn seen(&self) -> u64 {
        self.seen.load(Ordering::SeqCst)
    }
}

fn serve(mut conn: TcpStream, mode: &AtomicU8, seen: &AtomicU64) {
    let mut frames = FrameReader::new(MAX_FRAME_BYTES_DEFAULT);
    let mut enc = Encoder::new();
    let mut out = Vec::new();
    loop {
        match frames.read_from(&mut conn) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        while let Some(body) = frames.next_frame().unwrap() {
            let r = decode_request(body).unwrap();
            seen.fetch_add(1, Ordering::SeqCst);
            let (status, message) = match mode.load(Ordering::SeqCst) {
                OK => (Status::Ok, ""),
                BUSY => (Status::Overloaded, "busy"),
                DIE => return,
                _ => continue,
            };
            let mut output = vec![0f32; r.input.len() / r.dtype.size()];
            r.read_f32_into(&mut output);
            let ok = status == Status::Ok;
            let h = ResponseHeader {
                id: r.id,
                status,
                message,
                rows: if ok { r.rows } else { 0 },
                cols: if ok { r.cols } else { 0 },
                timings: Timings::default(),
                cached: false,
                partial: false,
                ticket: 0,
            };
            out.clear();
            enc.response(&h, &[], if ok { &output } else { &[] }, &mut out);
            if conn.write_all(&out).is_err() {
                return;
            }
        }
    }
}

fn req(x: &[f32]) -> RequestSpec<'_> {
    RequestSpec::row("t", x)
}

fn cluster(fakes: &[Fake], cfg: ClusterConfig) -> Cluster {
    let spec: Vec<String> = fakes.iter().map(|f| f.addr.to_string()).collect();
    Cluster::connect(&spec.join(","), cfg).unwrap()
}

fn fakes(n: usize) -> Vec<Fake> {
    (0..n).map(|_| Fake::start(OK)).collect()
}

/// An input whose best node is `fakes[want]`.
fn input_for(c: &Cluster, fakes: &[Fake], want: usize) -> Vec<f32> {
    (0..10_000)
        .map(|i| vec![i as f32, 0.5])
        .find(|x| c.route(&req(x))[0] == fakes[want].addr)
        .unwrap()
}

#[test]
fn requests_go_to_their_rendezvous_node_and_identical_inputs_meet() {
    let f = fakes(3);
    let c = cluster(&f, ClusterConfig::default());
    let mut per_node = [0; 3];
    for i in 0..90 {
        let x = [i as f32, 1.0];
        let a = c.predict(&req(&x)).unwrap();
        assert_eq!(a.node, c.route(&req(&x))[0]);
        assert_eq!(a.outputs, x);
        assert_eq!(a.attempts, 1);
        assert_eq!(c.predict(&req(&[i as f32, 1.0])).unwrap().node, a.node);
        per_node[f.iter().position(|f| f.addr == a.node).unwrap()] += 1;
    }
    assert!(per_node.iter().all(|&n| n > 10), "{per_node:?}");
}

#[test]
fn a_busy_node_is_retried_on_the_next_node_in_order() {
    let f = fakes(3);
    let c = cluster(&f, ClusterConfig::default());
    f[0].set(BUSY);
    let x = input_for(&c, &f, 0);
    let a = c.predict(&req(&x)).unwrap();
    assert_eq!(a.node, c.route(&req(&x))[1]);
    assert_eq!(a.attempts, 2);
    assert_eq!(c.nodes()[0].failed, 1);
}

#[test]
fn a_node_that_closes_mid_request_is_retried_then_skipped() {
    let f = fakes(3);
    let c = cluster(&f, ClusterConfig::default());
    f[1].set(DIE);
    let x = input_for(&c, &f, 1);
    let a = c.predict(&req(&x)).unwrap();
    assert_eq!((a.node, a.attempts), (c.route(&req(&x))[1], 2));
    // Until it reconnects, the node has no connection: its keys go to the
    // next node at the first try.
    if c.nodes()[1].live_connections == 0 {
        let b = c.predict(&req(&x)).unwrap();
        assert_eq!(b.node, a.node);
    }
    // Back to health: the keeper reconnects and the node gets its keys back.
    f[1].set(OK);
    let end = Instant::now() + Duration::from_secs(10);
    while c.predict(&req(&x)).unwrap().node != f[1].addr {
        assert!(Instant::now() < end, "node 1 never came back");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn all_nodes_busy_stops_after_the_bounded_attempts() {
    let f = fakes(4);
    for n in &f {
        n.set(BUSY);
    }
    let c = cluster(&f, ClusterConfig::default());
    let e = c.predict(&req(&[1.0])).err().unwrap();
    assert_eq!(e, ClientError::Overloaded("busy".into()));
    assert_eq!(f.iter().map(Fake::seen).sum::<u64>(), 3);
}

#[test]
fn no_retry_or_wait_past_the_deadline() {
    let f = fakes(2);
    let c = cluster(&f, ClusterConfig::default());
    f[0].set(HOLD);
    f[1].set(HOLD);
    let x = input_for(&c, &f, 0);
    let t = Instant::now();
    let e = c
        .predict(&RequestSpec {
            deadline_us: Some(30_000),
            ..req(&x)
        })
        .err()
        .unwrap();
    assert!(matches!(e, ClientError::DeadlineExceeded(_)), "{e:?}");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(30) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(
        (f[0].seen(), f[1].seen()),
        (1, 0),
        "sent once, never retried"
    );
}

#[test]
fn a_hedge_goes_to_the_next_node_and_the_first_answer_wins() {
    let f = fakes(3);
    let cfg = ClusterConfig {
        hedge: Some(Hedge::After(Duration::from_millis(20))),
        ..ClusterConfig::default()
    };
    let c = cluster(&f, cfg);
    let x = input_for(&c, &f, 2);
    f[2].set(HOLD);
    let a = c.predict(&req(&x)).unwrap();
    assert_eq!((a.node, a.attempts), (c.route(&req(&x))[1], 2));
    // A fast node answers before the hedge: one copy only.
    f[2].set(OK);
    let before: u64 = f.iter().map(Fake::seen).sum();
    let b = c.predict(&req(&[9.0, 9.0])).unwrap();
    assert_eq!(b.attempts, 1);
    assert_eq!(f.iter().map(Fake::seen).sum::<u64>(), before + 1);
}

#[test]
fn a_percentile_hedge_delay_follows_recent_latencies() {
    let f = fakes(2);
    let cfg = ClusterConfig {
        hedge: Some(Hedge::Percentile(0.9)),
        ..ClusterConfig::default()
    };
    let c = cluster(&f, cfg);
    assert_eq!(c.hedge_delay(), None);
    for i in 0..LATENCY_WINDOW {
        c.predict(&req(&[i as f32])).unwrap();
    }
    let d = c.hedge_delay().expect("a delay once answers are known");
    assert!(d > Duration::ZERO && d < Duration::from_secs(1), "{d:?}");
}

#[test]
fn an_unreachable_node_at_start_is_skipped_and_none_reachable_is_an_error() {
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let f = fakes(1);
    let c = Cluster::connect(&format!("{dead},{}", f[0].addr), ClusterConfig::default()).unwrap();
    for i in 0..20 {
        assert_eq!(c.predict(&req(&[i as f32])).unwrap().node, f[0].addr);
    }
    assert_eq!(c.nodes()[0].live_connections, 0);
    let e = Cluster::connect(&dead.to_string(), ClusterConfig::default())
        .err()
        .unwrap();
    assert!(e.contains("no node reachable"), "{e}");
}

#[test]
fn node_specs_parse() {
    let n = NodeSpec::parse_list("127.0.0.1:7878, 127.0.0.1:7879:9464,[::1]:7880:9465").unwrap();
    assert_eq!(n.len(), 3);
    assert_eq!(n[0].admin, None);
    assert_eq!(n[1].admin, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(n[2].addr, "[::1]:7880".parse().unwrap());
    assert_eq!(n[2].admin, Some("[::1]:9465".parse().unwrap()));
    // A name with several addresses: one node each (localhost may have 1 or 2).
    assert!(!NodeSpec::parse("localhost:7878").unwrap().is_empty());
    for bad in ["", "nohost", "127.0.0.1:x", "127.0.0.1:7878:y"] {
        assert!(NodeSpec::parse_list(bad).is_err(), "{bad}");
    }
}
