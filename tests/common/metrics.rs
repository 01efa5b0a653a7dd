//! The one reader of Prometheus text output, on `prometheus-parse`. A sample is found by
//! metric name and its exact label set (no more, no fewer labels; `le` of histogram buckets
//! does not count). Absence is explicit: [`Metrics::get`] says `None`, [`Metrics::value`]
//! fails the test, and only [`Metrics::value_or_zero`] reads absent as 0, for counters that
//! legitimately start absent. Histograms read as their sample count.

use std::collections::BTreeSet;

use prometheus_parse::{Sample, Scrape, Value};

/// One scrape, parsed.
pub struct Metrics(Scrape);

impl Metrics {
    /// Parses Prometheus text format; malformed text fails the test.
    pub fn parse(text: &str) -> Self {
        Self(
            Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format"),
        )
    }

    /// Every metric name with at least one sample (histograms by their base name).
    pub fn names(&self) -> BTreeSet<&str> {
        self.0.samples.iter().map(|s| s.metric.as_str()).collect()
    }

    /// The sample of `name` with exactly `labels`, or `None` when there is none. More than
    /// one such sample fails the test.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Sample> = self
            .0
            .samples
            .iter()
            .filter(|s| {
                s.metric == name
                    && s.labels.len() == labels.len()
                    && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
            })
            .collect();
        match found.as_slice() {
            [] => None,
            [s] => Some(number(s)),
            _ => panic!("{name} {labels:?}: {} samples match", found.len()),
        }
    }

    /// The sample of `name` with exactly `labels`; fails the test when it is absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            let same_name: Vec<String> = self
                .0
                .samples
                .iter()
                .filter(|s| s.metric == name)
                .map(|s| format!("{{{}}}", s.labels))
                .collect();
            panic!("no sample {name} with exactly {labels:?}; samples of {name}: {same_name:?}")
        })
    }

    /// Like [`Metrics::value`], but 0 when absent. Only for counters that are created on
    /// their first increment (a labelled counter nothing has counted yet has no series);
    /// the gateway's own families are all created up front, so they use `value`.
    pub fn value_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

fn number(s: &Sample) -> f64 {
    match &s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        // The +Inf bucket counts every observation.
        Value::Histogram(buckets) => {
            buckets
                .iter()
                .find(|b| b.less_than == f64::INFINITY)
                .unwrap_or_else(|| panic!("{}: histogram without a +Inf bucket", s.metric))
                .count
        }
        Value::Summary(_) => panic!("{}: summaries are not read by the tests", s.metric),
    }
}
