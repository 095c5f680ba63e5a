//! Reading Prometheus text from the admin server.

use std::collections::HashMap;

/// One sample of the Prometheus text format.
#[derive(Debug)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// Value.
    pub value: f64,
}

/// Parses the Prometheus text format (enough for tests: no escapes in labels).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
            .collect();
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value: value.parse().unwrap_or(f64::NAN),
        });
    }
    samples
}

/// Sum of the samples of `name` whose labels include all of `labels`.
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// Fetches `/metrics` from an admin address and sums `name` over `labels`.
pub async fn scrape(admin: std::net::SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = crate::get(admin, "localhost", "/metrics").await.text();
    sum(&parse_metrics(&text), name, labels)
}
