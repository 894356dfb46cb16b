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
pub use registry::Metrics;

#[cfg(feature = "server")]
mod registry {
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::counter::{ConstCounter, Counter};
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::ConstGauge;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;

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
