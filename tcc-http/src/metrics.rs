//! Prometheus metrics: request latency by route, phase-two call latency by outcome, and the engine's
//! counters, rendered as the Prometheus text format by [`Metrics::render`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tcc_core::Stats;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// The registry the server and the HTTP transport record into.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, String), Histogram>>,
    calls: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
    /// Phase-two batches sent: answered, failed as a whole, refused (the calls then went alone).
    batches: [AtomicU64; 3],
    batched_calls: AtomicU64,
}

/// What became of a phase-two batch, for [`Metrics::observe_batch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchOutcome {
    /// The participant answered each call.
    Answered,
    /// The batch failed as a whole in a way worth retrying (each call is retried).
    Failed,
    /// The participant does not take batches: the calls went alone.
    Refused,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Escapes a label value for the text format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    /// Records one HTTP request to the coordinator. `route` is the matched route pattern, never the
    /// raw path, so label cardinality stays bounded.
    pub fn observe_request(&self, method: &str, route: &str, status: u16, took: Duration) {
        let class = format!("{}xx", status / 100);
        // Clients choose the method (any token is a valid extension method): keep the label set
        // fixed, so nobody can grow this map without bound.
        let method = match method {
            "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS" => method,
            _ => "other",
        };
        lock(&self.requests).entry((method.to_owned(), route.to_owned(), class)).or_default().observe(took);
    }

    /// Records one phase-two call to a participant: `op` is confirm or cancel, `outcome` ok,
    /// transient or permanent.
    pub fn observe_call(&self, op: &'static str, outcome: &'static str, took: Duration) {
        lock(&self.calls).entry((op, outcome)).or_default().observe(took);
    }

    /// Records one phase-two batch of `calls` calls.
    pub fn observe_batch(&self, outcome: BatchOutcome, calls: usize) {
        self.batches[outcome as usize].fetch_add(1, Ordering::Relaxed);
        self.batched_calls.fetch_add(calls as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of everything: the engine's counters, the number of flagged
    /// transactions (`flagged`, read from the store) and the latency histograms.
    pub fn render(&self, stats: &Stats, flagged: u64) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, rows: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, v) in rows {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {v}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {v}");
                }
            }
        };
        counter(&mut out, "tcc_transactions_begun_total", "Transactions begun.", &[("", stats.begun)]);
        counter(
            &mut out,
            "tcc_transactions_finished_total",
            "Transactions finished, by outcome.",
            &[
                ("outcome=\"confirmed\"", stats.confirmed),
                ("outcome=\"cancelled\"", stats.cancelled),
                ("outcome=\"flagged\"", stats.flagged),
            ],
        );
        counter(
            &mut out,
            "tcc_deadline_cancellations_total",
            "Transactions cancelled because their deadline passed while trying.",
            &[("", stats.expired)],
        );
        counter(
            &mut out,
            "tcc_pruned_total",
            "Finished transactions deleted past their retention.",
            &[("", stats.pruned)],
        );
        counter(
            &mut out,
            "tcc_phase_two_calls_total",
            "Phase-two calls to participants, by result.",
            &[
                ("result=\"ok\"", stats.phase_two_calls.saturating_sub(stats.phase_two_failures)),
                ("result=\"failed\"", stats.phase_two_failures),
            ],
        );
        let batches = |o: BatchOutcome| self.batches[o as usize].load(Ordering::Relaxed);
        counter(
            &mut out,
            "tcc_phase_two_batches_total",
            "Phase-two batches sent to participants, by result (refused: the calls went alone).",
            &[
                ("result=\"answered\"", batches(BatchOutcome::Answered)),
                ("result=\"failed\"", batches(BatchOutcome::Failed)),
                ("result=\"refused\"", batches(BatchOutcome::Refused)),
            ],
        );
        counter(
            &mut out,
            "tcc_phase_two_batched_calls_total",
            "Phase-two calls sent in batches.",
            &[("", self.batched_calls.load(Ordering::Relaxed))],
        );
        counter(
            &mut out,
            "tcc_phase_two_retries_total",
            "Phase-two rounds that were retries.",
            &[("", stats.retries)],
        );
        let _ = writeln!(
            out,
            "# HELP tcc_flagged_transactions Transactions waiting for an operator.\n\
             # TYPE tcc_flagged_transactions gauge\ntcc_flagged_transactions {flagged}"
        );

        let name = "tcc_http_request_duration_seconds";
        let _ = writeln!(out, "# HELP {name} Coordinator API latency.\n# TYPE {name} histogram");
        for ((method, route, class), h) in lock(&self.requests).iter() {
            let labels = format!("method=\"{method}\",route=\"{}\",status=\"{class}\"", escape(route));
            h.render(&mut out, name, &labels);
        }
        let name = "tcc_phase_two_call_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Latency of phase-two calls to participants.\n# TYPE {name} histogram"
        );
        for ((op, outcome), h) in lock(&self.calls).iter() {
            h.render(&mut out, name, &format!("op=\"{op}\",outcome=\"{outcome}\""));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_counters_labelled() {
        let m = Metrics::default();
        m.observe_request("POST", "/v1/transactions", 200, Duration::from_micros(300));
        m.observe_request("POST", "/v1/transactions", 201, Duration::from_millis(3));
        m.observe_call("confirm", "ok", Duration::from_millis(20));
        m.observe_batch(BatchOutcome::Answered, 7);
        m.observe_batch(BatchOutcome::Answered, 3);
        m.observe_batch(BatchOutcome::Refused, 1);
        for i in 0..100 {
            m.observe_request(&format!("FOO{i}"), "unmatched", 405, Duration::from_micros(1));
        }
        let stats = Stats { begun: 5, confirmed: 3, cancelled: 1, flagged: 1, ..Stats::default() };
        let text = m.render(&stats, 1);
        for line in [
            "tcc_transactions_begun_total 5",
            "tcc_transactions_finished_total{outcome=\"confirmed\"} 3",
            "tcc_flagged_transactions 1",
            "tcc_phase_two_batches_total{result=\"answered\"} 2",
            "tcc_phase_two_batches_total{result=\"failed\"} 0",
            "tcc_phase_two_batches_total{result=\"refused\"} 1",
            "tcc_phase_two_batched_calls_total 11",
            "tcc_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/transactions\",status=\"2xx\",le=\"0.0005\"} 1",
            "tcc_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/transactions\",status=\"2xx\",le=\"0.005\"} 2",
            "tcc_http_request_duration_seconds_count{method=\"POST\",route=\"/v1/transactions\",status=\"2xx\"} 2",
            "tcc_phase_two_call_duration_seconds_count{op=\"confirm\",outcome=\"ok\"} 1",
            "tcc_http_request_duration_seconds_count{method=\"other\",route=\"unmatched\",status=\"4xx\"} 100",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
