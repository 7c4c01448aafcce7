//! The rollout series of `/metrics` (decisions, the canary's share and
//! accuracy), rendered from the registry and the lifecycle's counters.

use super::Counters;
use crate::server::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};

/// The rollout series of `/metrics`.
pub(super) fn render_rollouts(out: &mut String, reg: &Registry, c: &Counters) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "# HELP beast_rollout_decisions_total Rollout decisions (rule or by hand).\n# TYPE beast_rollout_decisions_total counter");
    let _ = writeln!(
        out,
        "beast_rollout_decisions_total{{decision=\"promoted\"}} {}\nbeast_rollout_decisions_total{{decision=\"rolled_back\"}} {}",
        c.promoted.load(Ordering::Relaxed),
        c.rolled_back.load(Ordering::Relaxed)
    );
    let series: [(&str, &str, &str); 8] = [
        (
            "beast_rollout_compared_total",
            "counter",
            "Requests run on both the current and the candidate version.",
        ),
        (
            "beast_rollout_agreement",
            "gauge",
            "Share of compared rows whose argmax agreed.",
        ),
        (
            "beast_rollout_max_abs_diff",
            "gauge",
            "Largest |difference| of any compared output.",
        ),
        (
            "beast_rollout_errors_total",
            "counter",
            "Compared runs that failed or gave a non-finite output, by version.",
        ),
        (
            "beast_rollout_compute_p99_us",
            "gauge",
            "p99 compute time of compared runs (bucket bound), by version.",
        ),
        (
            "beast_rollout_labels_total",
            "counter",
            "Canary answers given feedback (a label), by version.",
        ),
        (
            "beast_rollout_accuracy",
            "gauge",
            "Share of labelled canary answers that were right, by version (NaN: none).",
        ),
        (
            "beast_rollout_canary_served_total",
            "counter",
            "Requests the canary candidate answered.",
        ),
    ];
    for (name, kind, help) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for st in reg.rollouts.values() {
            let l = format!("model=\"{}\",candidate=\"{}\"", st.model, st.candidate);
            let ld = |x: &AtomicU64| x.load(Ordering::Relaxed);
            let _ = match name {
                "beast_rollout_compared_total" => {
                    writeln!(out, "{name}{{{l}}} {}", ld(&st.compared))
                }
                "beast_rollout_agreement" => writeln!(out, "{name}{{{l}}} {}", st.agreement()),
                "beast_rollout_max_abs_diff" => {
                    writeln!(out, "{name}{{{l}}} {}", st.max_abs_diff())
                }
                "beast_rollout_errors_total" => writeln!(
                    out,
                    "{name}{{{l},version=\"current\"}} {}\n{name}{{{l},version=\"candidate\"}} {}",
                    ld(&st.errors_current),
                    ld(&st.errors_candidate)
                ),
                "beast_rollout_compute_p99_us" => writeln!(
                    out,
                    "{name}{{{l},version=\"current\"}} {}\n{name}{{{l},version=\"candidate\"}} {}",
                    st.lat_current.quantile_us(0.99),
                    st.lat_candidate.quantile_us(0.99)
                ),
                "beast_rollout_labels_total" => writeln!(
                    out,
                    "{name}{{{l},version=\"current\"}} {}\n{name}{{{l},version=\"candidate\"}} {}",
                    st.accuracy(false).0,
                    st.accuracy(true).0
                ),
                "beast_rollout_accuracy" => {
                    let a = |c| st.accuracy(c).1.map_or(f64::NAN, |p| p / 100.0);
                    writeln!(
                        out,
                        "{name}{{{l},version=\"current\"}} {}\n{name}{{{l},version=\"candidate\"}} {}",
                        a(false),
                        a(true)
                    )
                }
                _ => writeln!(out, "{name}{{{l}}} {}", ld(&st.canary_served)),
            };
        }
    }
}
