//! Learned selection state as additive counters: what one shard, one node
//! or every node together learned from feedback, in a form that does not
//! depend on a shard's plan indices or domain slots, so that it can be
//! summed across shards and nodes (docs/SELECTION.md, "Learned state
//! shared between nodes") and saved to a file.
//!
//! Every learned quantity is a sum over feedback messages: a member's
//! right/total counts per domain, an arm's success/failure counts per
//! domain, the stacker's per-member, per-class sum of centred
//! log-probabilities ([`super::stacker`]). Merging is therefore a sum:
//! order-free, and idempotent as long as each source is counted once
//! (nodes overwrite their own total, never increment another's).
//!
//! Keys carry the member's fingerprint (name, version, digest) — an arm's
//! is its members' combined — so counters about other bytes of a model
//! never meet the current one's.

use std::collections::{BTreeMap, HashSet};

/// What a counter is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A member in a domain: `[correct, total]`.
    Acc,
    /// A bandit arm in a domain: `[successes, failures]`.
    Arm,
    /// The stacker's member and class (domain 0): `[sum of centred log p, feedback count]`.
    Stack,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Acc => "acc",
            Kind::Arm => "arm",
            Kind::Stack => "stack",
        }
    }
}

/// One counter's identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub ensemble: String,
    pub kind: Kind,
    /// `cost::domain_hash` of the domain (0: default).
    pub domain: u64,
    /// Member fingerprint (`feedback::member_fingerprint`), or an arm's.
    pub fp: u64,
    /// Class (stacker only; 0 otherwise).
    pub class: u32,
}

/// A set of additive counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    pub map: BTreeMap<Key, [f64; 2]>,
}

/// Header line of the text form; lines after it are
/// `KIND ENSEMBLE DOMAIN FP CLASS A B`.
const HEADER: &str = "beast-learned 1";

impl Counters {
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Add `v` to the counter `k`.
    pub fn add(&mut self, k: Key, v: [f64; 2]) {
        let e = self.map.entry(k).or_insert([0.0; 2]);
        e[0] += v[0];
        e[1] += v[1];
    }

    /// `self += other`.
    pub fn merge(&mut self, other: &Counters) {
        for (k, v) in &other.map {
            self.add(k.clone(), *v);
        }
    }

    /// The sum of `parts`.
    pub fn sum<'a>(parts: impl IntoIterator<Item = &'a Counters>) -> Counters {
        let mut s = Counters::default();
        for p in parts {
            s.merge(p);
        }
        s
    }

    /// `self − other`: counts never below 0 (rounding), the stacker's sums
    /// (which may be negative) as they are; entries that come out 0 are dropped.
    pub fn minus(&self, other: &Counters) -> Counters {
        let mut out = self.clone();
        for (k, v) in &other.map {
            let e = out.map.entry(k.clone()).or_insert([0.0; 2]);
            e[0] -= v[0];
            e[1] -= v[1];
            if k.kind != Kind::Stack {
                e[0] = e[0].max(0.0);
                e[1] = e[1].max(0.0);
            }
        }
        out.map
            .retain(|_, v| v[0].abs() > 1e-9 || v[1].abs() > 1e-9);
        out
    }

    /// Keep only counters about these fingerprints.
    pub fn retain_fps(&mut self, fps: &HashSet<u64>) {
        self.map.retain(|k, _| fps.contains(&k.fp));
    }

    /// The text form (one counter a line; `{}` of an f64 reads back exactly).
    pub fn encode(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::with_capacity(64 + self.map.len() * 64);
        s.push_str(HEADER);
        s.push('\n');
        for (k, v) in &self.map {
            if !name_ok(&k.ensemble) {
                continue;
            }
            let _ = writeln!(
                s,
                "{} {} {} {} {} {} {}",
                k.kind.name(),
                k.ensemble,
                k.domain,
                k.fp,
                k.class,
                v[0],
                v[1]
            );
        }
        s
    }

    /// Read the text form. Malformed lines are skipped and counted.
    /// Also reads the state files of earlier versions (no header; `acc E D FP
    /// C T`, `arm E D FP ALPHA BETA` with the prior inside, `stack E FP W…`
    /// weights): `prior` is the bandit's, `eta` the stacker's.
    pub fn decode(text: &str, prior: f64, eta: f64) -> (Counters, usize) {
        let mut c = Counters::default();
        let mut bad = 0;
        let mut lines = text.lines().peekable();
        let current = lines.peek().is_some_and(|l| l.trim() == HEADER);
        if current {
            lines.next();
        }
        for line in lines {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.is_empty() {
                continue;
            }
            let ok = if current {
                parse_line(&f).map(|(k, v)| c.add(k, v))
            } else {
                parse_old(&f, prior, eta).map(|kv| kv.into_iter().for_each(|(k, v)| c.add(k, v)))
            };
            bad += ok.is_none() as usize;
        }
        (c, bad)
    }
}

fn name_ok(n: &str) -> bool {
    !n.is_empty() && !n.chars().any(char::is_whitespace)
}

fn kind_of(s: &str) -> Option<Kind> {
    match s {
        "acc" => Some(Kind::Acc),
        "arm" => Some(Kind::Arm),
        "stack" => Some(Kind::Stack),
        _ => None,
    }
}

fn finite(s: &str) -> Option<f64> {
    s.parse::<f64>().ok().filter(|x| x.is_finite())
}

fn parse_line(f: &[&str]) -> Option<(Key, [f64; 2])> {
    if f.len() != 7 {
        return None;
    }
    let kind = kind_of(f[0])?;
    let (a, b) = (finite(f[5])?, finite(f[6])?);
    if kind != Kind::Stack && (a < 0.0 || b < 0.0) {
        return None;
    }
    let key = Key {
        ensemble: f[1].to_string(),
        kind,
        domain: f[2].parse().ok()?,
        fp: f[3].parse().ok()?,
        class: f[4].parse().ok()?,
    };
    Some((key, [a, b]))
}

/// A line of the state file before counters (see [`Counters::decode`]).
fn parse_old(f: &[&str], prior: f64, eta: f64) -> Option<Vec<(Key, [f64; 2])>> {
    let key = |kind, domain: &str, fp: &str, class| -> Option<Key> {
        Some(Key {
            ensemble: f[1].to_string(),
            kind,
            domain: domain.parse().ok()?,
            fp: fp.parse().ok()?,
            class,
        })
    };
    match (f.first().copied()?, f.len()) {
        ("acc", 6) => {
            let (c, t) = (finite(f[4])?, finite(f[5])?);
            Some(vec![(key(Kind::Acc, f[2], f[3], 0)?, [c, t])])
        }
        ("arm", 6) => {
            let (a, b) = (finite(f[4])? - prior, finite(f[5])? - prior);
            Some(vec![(
                key(Kind::Arm, f[2], f[3], 0)?,
                [a.max(0.0), b.max(0.0)],
            )])
        }
        ("stack", n) if n >= 4 => f[3..]
            .iter()
            .enumerate()
            .map(|(class, w)| {
                let w = finite(w).filter(|w| *w > 0.0)?;
                Some((
                    key(Kind::Stack, "0", f[2], class as u32)?,
                    [w.ln() / eta, 0.0],
                ))
            })
            .collect(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(kind: Kind, fp: u64) -> Key {
        Key {
            ensemble: "e".into(),
            kind,
            domain: 7,
            fp,
            class: 0,
        }
    }

    fn node(seed: u64) -> Counters {
        let mut c = Counters::default();
        c.add(k(Kind::Acc, 1), [seed as f64, 2.0 * seed as f64]);
        c.add(k(Kind::Arm, 2), [1.0, seed as f64]);
        c.add(k(Kind::Stack, 3), [-0.5 * seed as f64, seed as f64]);
        c
    }

    #[test]
    fn merging_is_order_free_and_idempotent() {
        let (a, b, c) = (node(1), node(2), node(5));
        let abc = Counters::sum([&a, &b, &c]);
        let cba = Counters::sum([&c, &b, &a]);
        assert_eq!(abc, cba, "order-free");
        assert_eq!(abc.map[&k(Kind::Acc, 1)], [8.0, 16.0]);
        assert_eq!(abc.map[&k(Kind::Stack, 3)], [-4.0, 8.0]);
        // Each node overwrites its own total: publishing b again (or a
        // newer b) and re-merging every node's latest gives the same sum,
        // never b twice.
        let mut latest = std::collections::BTreeMap::new();
        for (id, n) in [("a", &a), ("b", &b), ("c", &c), ("b", &b), ("a", &a)] {
            latest.insert(id, n.clone());
        }
        assert_eq!(Counters::sum(latest.values()), abc, "idempotent");
        // A shard's remote part: everything minus its own, and back.
        let remote = abc.minus(&b);
        assert_eq!(Counters::sum([&remote, &b]), abc);
        assert_eq!(remote, Counters::sum([&a, &c]));
        // Counts never go below 0 (a stale own part larger than the total).
        let neg = a.minus(&c);
        assert!(!neg.map.contains_key(&k(Kind::Acc, 1)), "{neg:?}");
        assert_eq!(neg.map[&k(Kind::Stack, 3)], [2.0, -4.0]);
    }

    #[test]
    fn text_form_round_trips_and_reads_old_state_files() {
        let mut c = Counters::sum([&node(1), &node(3)]);
        c.add(k(Kind::Stack, 9), [0.1 + 0.2, 1.0 / 3.0]);
        let (back, bad) = Counters::decode(&c.encode(), 1.0, 0.5);
        assert_eq!((back, bad), (c, 0));
        let (_, bad) = Counters::decode(
            &format!("{HEADER}\nacc e x 1 0 1 2\narm e 0 1 0 -1 2\nfoo\n"),
            1.0,
            0.5,
        );
        assert_eq!(bad, 3);
        let old = "acc e 5 11 3 4\narm e 5 12 3 2\nstack e 13 1 2.718281828459045\n";
        let (o, bad) = Counters::decode(old, 1.0, 0.5);
        assert_eq!(bad, 0);
        let key = |kind, domain, fp, class| Key {
            ensemble: "e".into(),
            kind,
            domain,
            fp,
            class,
        };
        assert_eq!(o.map[&key(Kind::Acc, 5, 11, 0)], [3.0, 4.0]);
        assert_eq!(o.map[&key(Kind::Arm, 5, 12, 0)], [2.0, 1.0]);
        assert_eq!(o.map[&key(Kind::Stack, 0, 13, 0)], [0.0, 0.0]);
        assert!((o.map[&key(Kind::Stack, 0, 13, 1)][0] - 2.0).abs() < 1e-12);
    }
}
