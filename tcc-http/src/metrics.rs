//! Prometheus metrics: request latency by route, phase-two call latency by outcome, and the engine's
//! counters, encoded by `prometheus-client` as OpenMetrics text in [`Metrics::render`].
//!
//! Only a coordinator server (the `server` feature) renders metrics; without it the same recording
//! calls do nothing, so an initiator's embedded engine pays nothing for them.

use std::time::Duration;

#[cfg(feature = "server")]
use tcc_core::Stats;

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

impl BatchOutcome {
    #[cfg(feature = "server")]
    fn label(self) -> &'static str {
        match self {
            BatchOutcome::Answered => "answered",
            BatchOutcome::Failed => "failed",
            BatchOutcome::Refused => "refused",
        }
    }
}

/// The Content-Type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(feature = "server")]
pub use recent::{RECENT_WINDOW, SLOT, Slot};
#[cfg(feature = "server")]
pub use registry::Metrics;

/// The recent past the operator's console charts: cumulative totals sampled when asked (at most one
/// sample per [`SLOT`], for [`RECENT_WINDOW`]), and what happened between consecutive samples.
#[cfg(feature = "server")]
mod recent {
    use std::collections::VecDeque;
    use std::time::Duration;

    /// The resolution of [`Metrics::recent`](super::Metrics::recent): one sample per slot.
    pub const SLOT: Duration = Duration::from_secs(5);
    /// How far back [`Metrics::recent`](super::Metrics::recent) reaches.
    pub const RECENT_WINDOW: Duration = Duration::from_secs(300);

    /// Cumulative counts at one instant.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub(crate) struct Totals {
        pub confirmed: u64,
        pub cancelled: u64,
        pub flagged: u64,
        pub calls: u64,
        pub failed_calls: u64,
        /// Phase-two calls timed by the transport, and their total time in microseconds.
        pub timed_calls: u64,
        pub call_us: u64,
    }

    /// What happened from the previous sample to `at_ms`.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Slot {
        /// When the slot ends (unix ms).
        pub at_ms: u64,
        /// Transactions that ended confirmed in it.
        pub confirmed: u64,
        /// Transactions that ended cancelled in it.
        pub cancelled: u64,
        /// Transactions flagged in it.
        pub flagged: u64,
        /// Phase-two calls made in it.
        pub calls: u64,
        /// Of those, calls that failed.
        pub failed_calls: u64,
        /// The mean latency of the phase-two calls timed in it, in microseconds.
        pub mean_call_us: Option<u64>,
    }

    /// The samples, oldest first; one before the window is kept as the first slot's start.
    #[derive(Debug, Default)]
    pub(crate) struct Samples(VecDeque<(u64, Totals)>);

    impl Samples {
        /// Takes `totals` as the sample at `now_ms` (replacing one taken earlier in the same slot)
        /// and returns the slots of the window, oldest first. Counters are cumulative: a smaller
        /// total than before (a restart) counts as nothing happened.
        pub(crate) fn sample(&mut self, now_ms: u64, totals: Totals) -> Vec<Slot> {
            let slot = SLOT.as_millis() as u64;
            let window = RECENT_WINDOW.as_millis() as u64;
            let q = &mut self.0;
            if let Some(&(last, _)) = q.back() {
                if now_ms < last {
                    return self.slots(); // the clock went back: keep what we have
                }
                // The previous sample stays the start of this slot, unless it is one of this slot.
                if q.len() > 1 && last / slot == now_ms / slot {
                    q.pop_back();
                }
            }
            q.push_back((now_ms, totals));
            while q.len() > 2 && q.get(1).is_some_and(|&(at, _)| at + window < now_ms) {
                q.pop_front();
            }
            self.slots()
        }

        fn slots(&self) -> Vec<Slot> {
            let q = &self.0;
            q.iter()
                .zip(q.iter().skip(1))
                .map(|((_, a), (at_ms, b))| {
                    let d = |x: u64, y: u64| y.saturating_sub(x);
                    let timed = d(a.timed_calls, b.timed_calls);
                    Slot {
                        at_ms: *at_ms,
                        confirmed: d(a.confirmed, b.confirmed),
                        cancelled: d(a.cancelled, b.cancelled),
                        flagged: d(a.flagged, b.flagged),
                        calls: d(a.calls, b.calls),
                        failed_calls: d(a.failed_calls, b.failed_calls),
                        mean_call_us: (timed > 0).then(|| d(a.call_us, b.call_us) / timed),
                    }
                })
                .collect()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn at(confirmed: u64, timed_calls: u64, call_us: u64) -> Totals {
            Totals { confirmed, timed_calls, call_us, ..Totals::default() }
        }

        #[test]
        fn slots_are_differences_between_samples_one_per_slot_within_the_window() {
            let mut s = Samples::default();
            assert!(s.sample(1_000, at(10, 0, 0)).is_empty(), "the first sample only starts a slot");
            let slots = s.sample(2_000, at(12, 2, 3_000));
            assert_eq!(slots.len(), 1);
            assert_eq!((slots[0].confirmed, slots[0].mean_call_us), (2, Some(1_500)));
            // Same slot (5 s): the latest sample replaces the previous one, measured from the start.
            let slots = s.sample(4_000, at(15, 2, 3_000));
            assert_eq!(slots.len(), 1);
            assert_eq!((slots[0].at_ms, slots[0].confirmed, slots[0].mean_call_us), (4_000, 5, Some(1_500)));
            let slots = s.sample(6_000, at(16, 2, 3_000));
            assert_eq!(slots.iter().map(|s| s.confirmed).collect::<Vec<_>>(), [5, 1]);
            // Far later: what fell out of the window is forgotten, one sample before it stays.
            let later = 6_000 + RECENT_WINDOW.as_millis() as u64 + 10_000;
            let slots = s.sample(later, at(20, 2, 3_000));
            assert_eq!(slots.len(), 1, "{slots:?}");
            assert_eq!(slots[0].confirmed, 4);
            // A restart's smaller totals count as nothing, not as an underflow.
            let slots = s.sample(later + 6_000, at(1, 0, 0));
            assert_eq!(slots.last().map(|s| s.confirmed), Some(0));
            // A clock that went back changes nothing.
            assert_eq!(s.sample(0, at(99, 0, 0)), slots);
        }
    }
}

#[cfg(feature = "server")]
mod registry {
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::counter::{ConstCounter, Counter};
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::ConstGauge;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::recent::{Samples, Slot, Totals};
    use super::{BatchOutcome, Duration, Stats};

    /// Upper bounds of the latency buckets, in seconds.
    const BUCKETS: [f64; 14] =
        [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

    fn latency() -> Histogram {
        Histogram::new(BUCKETS)
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct RequestLabels {
        method: &'static str,
        route: String,
        status: String,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct CallLabels {
        op: &'static str,
        outcome: &'static str,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct ResultLabel {
        result: &'static str,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct OutcomeLabel {
        outcome: &'static str,
    }

    /// The registry the server and the HTTP transport record into.
    #[derive(Debug)]
    pub struct Metrics {
        requests: Family<RequestLabels, Histogram, fn() -> Histogram>,
        calls: Family<CallLabels, Histogram, fn() -> Histogram>,
        batches: Family<ResultLabel, Counter>,
        batched_calls: Counter,
        // The phase-two calls timed so far and their total time, sampled for the console's chart.
        timed_calls: AtomicU64,
        call_us: AtomicU64,
        samples: Mutex<Samples>,
    }

    impl Default for Metrics {
        fn default() -> Metrics {
            let batches = Family::<ResultLabel, Counter>::default();
            // Every result shows, at 0 until it happens.
            for o in [BatchOutcome::Answered, BatchOutcome::Failed, BatchOutcome::Refused] {
                let _ = batches.get_or_create(&ResultLabel { result: o.label() });
            }
            Metrics {
                requests: Family::new_with_constructor(latency),
                calls: Family::new_with_constructor(latency),
                batches,
                batched_calls: Counter::default(),
                timed_calls: AtomicU64::new(0),
                call_us: AtomicU64::new(0),
                samples: Mutex::new(Samples::default()),
            }
        }
    }

    impl Metrics {
        /// Records one HTTP request to the coordinator. `route` is the matched route pattern, never
        /// the raw path, so label cardinality stays bounded.
        pub fn observe_request(&self, method: &str, route: &str, status: u16, took: Duration) {
            // Clients choose the method (any token is a valid extension method): keep the label set
            // fixed, so nobody can grow the family without bound.
            let method = match method {
                "GET" => "GET",
                "HEAD" => "HEAD",
                "POST" => "POST",
                "PUT" => "PUT",
                "PATCH" => "PATCH",
                "DELETE" => "DELETE",
                "OPTIONS" => "OPTIONS",
                _ => "other",
            };
            let labels =
                RequestLabels { method, route: route.to_owned(), status: format!("{}xx", status / 100) };
            self.requests.get_or_create(&labels).observe(took.as_secs_f64());
        }

        /// Records one phase-two call to a participant: `op` is confirm or cancel, `outcome` ok,
        /// transient or permanent.
        pub fn observe_call(&self, op: &'static str, outcome: &'static str, took: Duration) {
            self.calls.get_or_create(&CallLabels { op, outcome }).observe(took.as_secs_f64());
            self.timed_calls.fetch_add(1, Ordering::Relaxed);
            self.call_us.fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        }

        /// Samples the engine's `stats` and the call timings at `now_ms` (unix ms) and returns what
        /// happened in each [`SLOT`](super::SLOT) of the last [`RECENT_WINDOW`](super::RECENT_WINDOW)
        /// that was sampled, oldest first. Sampling happens only when asked (the console asks every
        /// few seconds while open): a slot nobody asked in is merged into the next one asked.
        pub fn recent(&self, now_ms: u64, stats: &Stats) -> Vec<Slot> {
            let totals = Totals {
                confirmed: stats.confirmed,
                cancelled: stats.cancelled,
                flagged: stats.flagged,
                calls: stats.phase_two_calls,
                failed_calls: stats.phase_two_failures,
                timed_calls: self.timed_calls.load(Ordering::Relaxed),
                call_us: self.call_us.load(Ordering::Relaxed),
            };
            self.samples.lock().unwrap_or_else(|p| p.into_inner()).sample(now_ms, totals)
        }

        /// Records one phase-two batch of `calls` calls.
        pub fn observe_batch(&self, outcome: BatchOutcome, calls: usize) {
            self.batches.get_or_create(&ResultLabel { result: outcome.label() }).inc();
            self.batched_calls.inc_by(calls as u64);
        }

        /// Everything as OpenMetrics text (served as [`CONTENT_TYPE`](super::CONTENT_TYPE)): the
        /// engine's counters, the number of flagged transactions (`flagged`, read from the store) and
        /// the latency histograms.
        pub fn render(&self, stats: &Stats, flagged: u64) -> String {
            let mut registry = Registry::default();
            // prometheus-client adds the `_total` of a counter's samples and the full stop of a help.
            registry.register("tcc_transactions_begun", "Transactions begun", ConstCounter::new(stats.begun));
            let finished = Family::<OutcomeLabel, Counter>::default();
            for (outcome, n) in
                [("confirmed", stats.confirmed), ("cancelled", stats.cancelled), ("flagged", stats.flagged)]
            {
                finished.get_or_create(&OutcomeLabel { outcome }).inc_by(n);
            }
            registry.register("tcc_transactions_finished", "Transactions finished, by outcome", finished);
            registry.register(
                "tcc_deadline_cancellations",
                "Transactions cancelled because their deadline passed while trying",
                ConstCounter::new(stats.expired),
            );
            registry.register(
                "tcc_pruned",
                "Finished transactions deleted past their retention",
                ConstCounter::new(stats.pruned),
            );
            let calls = Family::<ResultLabel, Counter>::default();
            let failed = stats.phase_two_failures;
            calls
                .get_or_create(&ResultLabel { result: "ok" })
                .inc_by(stats.phase_two_calls.saturating_sub(failed));
            calls.get_or_create(&ResultLabel { result: "failed" }).inc_by(failed);
            registry.register("tcc_phase_two_calls", "Phase-two calls to participants, by result", calls);
            registry.register(
                "tcc_phase_two_batches",
                "Phase-two batches sent to participants, by result (refused: the calls went alone)",
                self.batches.clone(),
            );
            registry.register(
                "tcc_phase_two_batched_calls",
                "Phase-two calls sent in batches",
                self.batched_calls.clone(),
            );
            registry.register(
                "tcc_phase_two_retries",
                "Phase-two rounds that were retries",
                ConstCounter::new(stats.retries),
            );
            registry.register(
                "tcc_flagged_transactions",
                "Transactions waiting for an operator",
                ConstGauge::new(i64::try_from(flagged).unwrap_or(i64::MAX)),
            );
            registry.register(
                "tcc_http_request_duration_seconds",
                "Coordinator API latency",
                self.requests.clone(),
            );
            registry.register(
                "tcc_phase_two_call_duration_seconds",
                "Latency of phase-two calls to participants",
                self.calls.clone(),
            );
            let mut out = String::new();
            // Writing into a String cannot fail.
            let _ = encode(&mut out, &registry);
            out
        }
    }
}

/// Without the `server` feature nothing renders metrics, so nothing is recorded.
#[cfg(not(feature = "server"))]
#[derive(Debug, Default)]
pub struct Metrics {
    // Not a unit struct: built with `Metrics::default()` as the server's registry is.
    _nothing: (),
}

#[cfg(not(feature = "server"))]
impl Metrics {
    /// Records nothing: only a server renders metrics.
    pub fn observe_request(&self, _method: &str, _route: &str, _status: u16, _took: Duration) {}

    /// Records nothing: only a server renders metrics.
    pub fn observe_call(&self, _op: &'static str, _outcome: &'static str, _took: Duration) {}

    /// Records nothing: only a server renders metrics.
    pub fn observe_batch(&self, _outcome: BatchOutcome, _calls: usize) {}
}

#[cfg(all(test, feature = "server"))]
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
            // prometheus-client writes `le` first; the order of labels carries no meaning.
            "tcc_http_request_duration_seconds_bucket{le=\"0.0005\",method=\"POST\",route=\"/v1/transactions\",status=\"2xx\"} 1",
            "tcc_http_request_duration_seconds_bucket{le=\"0.005\",method=\"POST\",route=\"/v1/transactions\",status=\"2xx\"} 2",
            "tcc_http_request_duration_seconds_count{method=\"POST\",route=\"/v1/transactions\",status=\"2xx\"} 2",
            "tcc_phase_two_call_duration_seconds_count{op=\"confirm\",outcome=\"ok\"} 1",
            "tcc_http_request_duration_seconds_count{method=\"other\",route=\"unmatched\",status=\"4xx\"} 100",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert_eq!(text.lines().last(), Some("# EOF"), "OpenMetrics text ends so: {text}");
        assert!(text.contains("# TYPE tcc_transactions_begun counter\n"), "{text}");
    }
}
