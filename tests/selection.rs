//! Member selection against a real server: cascade, vote, the learned
//! combiner, feedback, the bandit, deadlines and the straggler cutoff.
//! The models are built by hand so the right answer is known.

mod common;

use beast::client::{Client, ClientError};
use beast::config::Config;
use beast::model::load::Repository;
use beast::model::{
    Activation, BatchLimits, CascadeMetric, Combiner, Dense, EnsembleSpec, F16Storage, Model,
    OutputTransform, Policy,
};
use beast::wire::{CacheControl, Input, PolicyOverride, RequestSpec};
use common::{start_with, test_config, within_three_tries};
use half::f16;
use std::sync::Arc;
use std::time::{Duration, Instant};

const W: usize = 4;
const C: usize = 3;

fn batch(delay_us: u64) -> BatchLimits {
    BatchLimits {
        max_batch: 16,
        min_batch: 1,
        max_queue_delay_us: delay_us,
        queue_rows_max: 1 << 16,
    }
}

/// 4 → 3, zero weights: the same softmax(bias) for every input.
fn constant(name: &str, bias: [f32; C]) -> Model {
    Model {
        name: name.into(),
        version: 1,
        input_width: W,
        output_width: C,
        layers: vec![Dense {
            in_dim: W,
            out_dim: C,
            weight: F16Storage::Owned(vec![f16::ZERO; W * C]),
            bias: bias.to_vec(),
            layer_norm: None,
            activation: Activation::Identity,
        }],
        output: OutputTransform::Softmax,
        batch: batch(50),
        task: Default::default(),
        io: Default::default(),
        digest: 0,
        forest: None,
    }
    .with_params_digest()
}

/// 4 → 64 → 3, expensive: class 1 (sure) when x0 = 1, class 0 (p 0.78) when x0 = 0.
fn expensive(name: &str, delay_us: u64) -> Model {
    let hidden = 64;
    let mut w1 = vec![f16::ZERO; W * hidden];
    w1[0] = f16::ONE; // h0 = relu(x0)
    let mut w2 = vec![f16::ZERO; hidden * C];
    w2[1] = f16::from_f32(20.0); // logit1 += 20 h0
    Model {
        name: name.into(),
        version: 1,
        input_width: W,
        output_width: C,
        layers: vec![
            Dense {
                in_dim: W,
                out_dim: hidden,
                weight: F16Storage::Owned(w1),
                bias: vec![0.0; hidden],
                layer_norm: None,
                activation: Activation::Relu,
            },
            Dense {
                in_dim: hidden,
                out_dim: C,
                weight: F16Storage::Owned(w2),
                bias: vec![2.0, 0.0, 0.0],
                layer_norm: None,
                activation: Activation::Identity,
            },
        ],
        output: OutputTransform::Softmax,
        batch: batch(delay_us),
        task: Default::default(),
        io: Default::default(),
        digest: 0,
        forest: None,
    }
    .with_params_digest()
}

fn ens(name: &str, members: &[&str], combiner: Combiner, policy: Policy) -> EnsembleSpec {
    let mut e = EnsembleSpec::mean(name, members);
    e.combiner = combiner;
    e.selection.policy = policy;
    e
}

/// `sure0`: class 0, p 0.9993 (cheap). `unsure`: class 0, p 0.38 (cheap).
/// `big`: see [`expensive`]. `slow`: like `big`, 300 ms batching delay.
fn repository() -> Repository {
    let mut repo = Repository::default();
    let mut slow = expensive("slow", 300_000);
    slow.batch.max_batch = 1024;
    // Waits for a full batch: a request sits in the queue for the delay.
    slow.batch.min_batch = 1024;
    for m in [
        constant("sure0", [8.0, 0.0, 0.0]),
        constant("unsure", [0.2, 0.0, 0.0]),
        expensive("big", 50),
        slow,
    ] {
        repo.models.insert(m.name.clone(), vec![Arc::new(m)]);
    }
    for e in [
        ens("casc", &["big", "sure0"], Combiner::Mean, Policy::Cascade),
        ens("casc2", &["big", "unsure"], Combiner::Mean, Policy::Cascade),
        {
            let mut e = ens(
                "margin",
                &["big", "unsure"],
                Combiner::Mean,
                Policy::Cascade,
            );
            e.selection.cascade_metric = CascadeMetric::Margin;
            e.selection.cascade_threshold = 0.3;
            e
        },
        ens(
            "vote",
            &["sure0", "unsure", "big"],
            Combiner::Vote,
            Policy::All,
        ),
        ens("stack", &["sure0", "big"], Combiner::Stacked, Policy::All),
        ens("pair", &["sure0", "big"], Combiner::Mean, Policy::All),
        ens("band", &["sure0", "big"], Combiner::Mean, Policy::Bandit),
        ens(
            "dl",
            &["sure0", "big", "slow"],
            Combiner::Mean,
            Policy::Deadline,
        ),
        ens("straggle", &["sure0", "slow"], Combiner::Mean, Policy::All),
    ] {
        repo.ensembles.insert(e.name.clone(), e);
    }
    repo
}

fn start(cfg: Config) -> (beast::server::ServerHandle, Client) {
    let h = start_with(cfg, repository());
    let c = Client::connect(h.addr).unwrap();
    (h, c)
}

/// `rows` rows with x0 = `x0`.
fn input(rows: usize, x0: f32) -> Vec<f32> {
    (0..rows)
        .flat_map(|r| [x0, r as f32 * 0.01, 0.0, 0.0])
        .collect()
}

fn req<'a>(target: &'a str, x: &'a [f32], policy: PolicyOverride) -> RequestSpec<'a> {
    RequestSpec {
        target,
        version: None,
        rows: (x.len() / W) as u32,
        cols: W as u32,
        input: Input::F32(x),
        deadline_us: None,
        domain: None,
        cache: CacheControl::Bypass,
        policy,
    }
}

fn ran(p: &beast::client::Prediction) -> Vec<&str> {
    p.runs.iter().map(|r| r.0.as_str()).collect()
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b })
}

#[test]
fn cascade_stops_at_the_confident_cheap_member() {
    let (h, c) = start(test_config());
    let x = input(3, 1.0);
    let p = c
        .predict(&req("casc", &x, PolicyOverride::Default))
        .unwrap();
    // Cheapest first (sure0 is declared second), confident: big never runs.
    assert_eq!(ran(&p), ["sure0"]);
    assert!(argmax(&p.outputs[..C]) == 0 && p.outputs[0] > 0.99);
    assert!(!p.partial);
    // The override runs everyone: the mean of the two disagreeing members.
    let all = c.predict(&req("casc", &x, PolicyOverride::All)).unwrap();
    assert_eq!(ran(&all), ["big", "sure0"]);
    assert!((all.outputs[0] - 0.5).abs() < 0.01);
    // Not confident after the cheap member: the next one runs too.
    let p = c
        .predict(&req("casc2", &x, PolicyOverride::Default))
        .unwrap();
    assert_eq!(ran(&p), ["big", "unsure"]);
    assert!(
        p.runs.iter().all(|r| r.2 > 0),
        "both computed: {:?}",
        p.runs
    );
    // The pair's mean is sure of class 1 by margin, with the margin metric too.
    assert_eq!(argmax(&p.outputs[..C]), 1);
    let m = c
        .predict(&req("margin", &x, PolicyOverride::Default))
        .unwrap();
    assert_eq!(ran(&m), ["big", "unsure"]);
    // A cascade override on an `all` ensemble.
    let p = c
        .predict(&req("pair", &x, PolicyOverride::Cascade))
        .unwrap();
    assert_eq!(ran(&p), ["sure0"]);
    let s = h.selection_stats();
    let casc = s.iter().find(|s| s.ensemble == "casc").unwrap();
    assert_eq!((casc.requests, casc.domain.as_str()), (2, ""));
    assert!(casc.flops_saved() > 0 && casc.flops_run < casc.flops_all);
    // Per domain.
    let mut r = req("casc2", &x, PolicyOverride::Default);
    r.domain = Some("shop");
    c.predict(&r).unwrap();
    c.predict(&r).unwrap();
    let s = h.selection_stats();
    let shop = s
        .iter()
        .find(|s| s.ensemble == "casc2" && s.domain == "shop")
        .unwrap();
    assert_eq!((shop.requests, shop.members_run), (2, 4));
    assert_eq!(shop.flops_saved(), 0);
    drop(c);
    h.shutdown();
}

#[test]
fn cascade_steps_use_the_member_cache() {
    let (h, c) = start(test_config());
    let x = input(1, 1.0);
    let mut r = req("casc2", &x, PolicyOverride::Default);
    r.cache = CacheControl::Use;
    let first = c.predict(&r).unwrap();
    assert!(!first.cached);
    // The same rows to `all`: both members come from the member-level cache.
    r.policy = PolicyOverride::All;
    let second = c.predict(&r).unwrap();
    assert_eq!(ran(&second), ["big", "unsure"]);
    assert!(second.runs.iter().all(|r| r.2 == 0), "{:?}", second.runs);
    assert_eq!(first.outputs, second.outputs);
    // And the cascade's own answer is cached at the ensemble level.
    r.policy = PolicyOverride::Default;
    assert!(c.predict(&r).unwrap().cached);
    drop(c);
    h.shutdown();
}

#[test]
fn vote_counts_members() {
    let (h, c) = start(test_config());
    let x = input(1, 1.0);
    let p = c
        .predict(&req("vote", &x, PolicyOverride::Default))
        .unwrap();
    // sure0 and unsure say 0, big says 1.
    assert!((p.outputs[0] - 2.0 / 3.0).abs() < 1e-3, "{:?}", p.outputs);
    assert!((p.outputs[1] - 1.0 / 3.0).abs() < 1e-3);
    drop(c);
    h.shutdown();
}

#[test]
fn feedback_tickets() {
    let (h, c) = start(test_config());
    let x = input(1, 1.0);
    let p = c
        .predict(&req("pair", &x, PolicyOverride::Default))
        .unwrap();
    assert_ne!(p.ticket, 0);
    c.feedback(p.ticket, 1).unwrap();
    // Once only.
    assert!(matches!(
        c.feedback(p.ticket, 1),
        Err(ClientError::NotFound(_))
    ));
    assert!(matches!(
        c.feedback(12345, 0),
        Err(ClientError::NotFound(_))
    ));
    let p = c
        .predict(&req("pair", &x, PolicyOverride::Default))
        .unwrap();
    // A label that is not a class: refused, the ticket still good.
    assert!(matches!(
        c.feedback(p.ticket, 7),
        Err(ClientError::BadRequest(_))
    ));
    // Another connection (same shard: one shard here) cannot spend it.
    let other = Client::connect(h.addr).unwrap();
    assert!(matches!(
        other.feedback(p.ticket, 0),
        Err(ClientError::NotFound(_))
    ));
    c.feedback(p.ticket, 0).unwrap();
    // A model answer has no ticket.
    let m = c.predict(&req("big", &x, PolicyOverride::Default)).unwrap();
    assert_eq!(m.ticket, 0);
    let s = h.selection_stats();
    let pair = s.iter().find(|s| s.ensemble == "pair").unwrap();
    // The pair answers class 0 (sure0 at 0.9993 edges out big): label 0 was right.
    assert_eq!((pair.feedback, pair.feedback_correct), (2, 1));
    drop(c);
    h.shutdown();
}

#[test]
fn feedback_window_expires_old_tickets() {
    let mut cfg = test_config();
    cfg.feedback_window = 4;
    let (h, c) = start(cfg);
    let x = input(1, 1.0);
    let first = c
        .predict(&req("pair", &x, PolicyOverride::Default))
        .unwrap();
    for _ in 0..4 {
        c.predict(&req("pair", &x, PolicyOverride::Default))
            .unwrap();
    }
    assert!(matches!(
        c.feedback(first.ticket, 1),
        Err(ClientError::NotFound(_))
    ));
    drop(c);
    h.shutdown();
}

#[test]
fn stacker_learns_to_trust_the_right_member() {
    let (h, c) = start(test_config());
    let x = input(1, 1.0);
    let before = c
        .predict(&req("stack", &x, PolicyOverride::Default))
        .unwrap();
    assert!((before.outputs[0] - before.outputs[1]).abs() < 0.01);
    for _ in 0..40 {
        let p = c
            .predict(&req("stack", &x, PolicyOverride::Default))
            .unwrap();
        c.feedback(p.ticket, 1).unwrap();
    }
    let after = c
        .predict(&req("stack", &x, PolicyOverride::Default))
        .unwrap();
    assert_eq!(argmax(&after.outputs), 1, "{:?}", after.outputs);
    assert!(after.outputs[1] > 0.6);
    drop(c);
    h.shutdown();
}

/// Truth is class 1; `sure0` always says 0. Returns, over the last 100
/// requests, how many ran `big` and how many answers were right.
fn train_bandit(c: &Client, n: usize) -> (usize, usize) {
    let x = input(1, 1.0);
    let (mut with_big, mut right) = (0, 0);
    for i in 0..n {
        let p = c
            .predict(&req("band", &x, PolicyOverride::Default))
            .unwrap();
        if i + 100 >= n {
            with_big += ran(&p).contains(&"big") as usize;
            right += (argmax(&p.outputs) == 1) as usize;
        }
        c.feedback(p.ticket, 1).unwrap();
    }
    (with_big, right)
}

#[test]
fn bandit_learns_from_feedback_and_persists() {
    let dir = common::temp_dir("bandit-state");
    let mut cfg = test_config();
    cfg.selection_state_path = dir.join("sel");
    let (h, c) = start(cfg.clone());
    let (with_big, right) = train_bandit(&c, 300);
    assert!(
        with_big >= 90 && right >= 85,
        "big {with_big}, right {right}"
    );
    drop(c);
    h.shutdown();
    assert!(dir.join("sel.0").exists());
    // A restart starts from what was learned.
    let (h, c) = start(cfg);
    let x = input(1, 1.0);
    let mut big = 0;
    for _ in 0..50 {
        let p = c
            .predict(&req("band", &x, PolicyOverride::Default))
            .unwrap();
        big += ran(&p).contains(&"big") as usize;
    }
    assert!(big >= 45, "after restart big ran {big} of 50");
    drop(c);
    h.shutdown();
}

#[test]
fn deadline_policy_picks_what_fits_or_refuses_at_once() {
    let (h, c) = start(test_config());
    let x = input(1, 1.0);
    // No budget: every member.
    let p = c.predict(&req("dl", &x, PolicyOverride::Default)).unwrap();
    assert_eq!(ran(&p).len(), 3);
    // 150 ms: `slow` (300 ms batching delay) cannot make it; the others can
    // (with room for a stall of the loaded test machine before the cutoff).
    let mut r = req("dl", &x, PolicyOverride::Default);
    r.deadline_us = Some(150_000);
    let p = c.predict(&r).unwrap();
    assert_eq!(ran(&p), ["sure0", "big"]);
    assert!(!p.partial);
    // 1 µs: nobody can; refused before any compute.
    r.deadline_us = Some(1);
    let t = Instant::now();
    assert!(matches!(
        c.predict(&r),
        Err(ClientError::DeadlineExceeded(_))
    ));
    // Before any compute: well inside `slow`'s 300 ms batching delay (a
    // tighter bound fails on a loaded 2-core CI machine, not on the server).
    assert!(
        t.elapsed() < Duration::from_millis(150),
        "{:?}",
        t.elapsed()
    );
    let s = h.selection_stats();
    assert_eq!(
        s.iter()
            .find(|s| s.ensemble == "dl")
            .unwrap()
            .deadline_refused,
        1
    );
    drop(c);
    h.shutdown();
}

/// Tolerance of the straggler cutoff over a request's budget, measured on
/// the client, whose reader thread takes the 400 answers that come at once
/// one by one (on a shared, loaded machine: generous; anything below
/// `slow`'s 300 ms delay minus the budget still fails an answer that
/// waited for `slow`).
const CUTOFF_TOLERANCE_MS: u64 = 150;
/// The same, measured in the server (arrival to answer): the timer's lag.
const SERVER_CUTOFF_TOLERANCE_MS: u64 = 5;

#[test]
fn straggler_cutoff_answers_by_the_deadline_under_flood() {
    // A loaded test machine can make a try miss (its cutoffs fire more than
    // the 1 ms grace late, so they answer DEADLINE_EXCEEDED instead of
    // partial; seen at load 3 on 2 cores): up to three tries on fresh
    // servers. A cutoff that never answers partial, or waits for `slow`,
    // fails all three.
    within_three_tries("the flood", flood_once);
}

/// One flood on a fresh server: Err when too few answers were partial or
/// too many came late at the client.
fn flood_once() -> Result<(), String> {
    let (h, c) = start(test_config());
    let x = input(1, 1.0);
    let budget_ms = 30;
    // Far more than the slow member answers within its 300 ms delay.
    let n = 400;
    let mut pending = Vec::new();
    for i in 0..n {
        let target = if i % 2 == 0 { "straggle" } else { "dl" };
        let mut r = req(target, &x, PolicyOverride::Default);
        if i % 4 == 1 {
            r.policy = PolicyOverride::All; // make `dl` wait for `slow` too
        }
        r.deadline_us = Some(budget_ms * 1000);
        pending.push((Instant::now(), c.send(&r).unwrap()));
    }
    let (mut partial, mut refused, mut full, mut late) = (0, 0, 0, 0);
    let mut worst = Duration::ZERO;
    // Server side: arrival to answer, as the response reports it.
    let mut worst_server_us = 0;
    for (sent, p) in pending {
        let r = p.wait();
        let took = sent.elapsed();
        worst = worst.max(took);
        if took > Duration::from_millis(budget_ms + CUTOFF_TOLERANCE_MS) {
            eprintln!("late at the client: {took:?} for a {budget_ms} ms budget: {r:?}");
            late += 1;
        }
        if let Ok(p) = &r {
            worst_server_us = worst_server_us.max(p.timings.total_us);
        }
        match r {
            Ok(p) if p.partial => {
                assert!(!ran(&p).contains(&"slow"));
                partial += 1;
            }
            Ok(_) => full += 1,
            Err(ClientError::DeadlineExceeded(_)) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    eprintln!(
        "cutoff: {partial} partial, {full} full, {refused} deadline exceeded; worst: {worst:?} at the client, {worst_server_us} µs in the server"
    );
    assert!(
        worst_server_us as u64 <= (budget_ms + SERVER_CUTOFF_TOLERANCE_MS) * 1000,
        "{worst_server_us} µs in the server for a {budget_ms} ms budget"
    );
    drop(c);
    h.shutdown();
    if partial < n / 2 {
        return Err(format!("{partial} partial of {n}"));
    }
    // At the client, a stalled test machine delays whatever is being read
    // at that moment (seen: 230 ms at load 7 on 2 cores); an answer that
    // waited for `slow` would make every `All` request late (a quarter).
    if late > n / 20 {
        return Err(format!(
            "{late} of {n} answers later than {budget_ms} + {CUTOFF_TOLERANCE_MS} ms at the client"
        ));
    }
    Ok(())
}
