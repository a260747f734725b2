//! `bench --metrics` (binary built with the `metrics` feature): a small in-process recorder
//! that keeps what the client reports and prints it when the run ends.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};

/// A histogram's samples.
#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(value);
    }
}

enum Entry {
    Counter(Arc<AtomicU64>),
    Gauge(Arc<AtomicU64>),
    Histogram(Arc<Samples>),
}

/// Every metric registered, by `name{label="value",...}`.
#[derive(Clone, Default)]
pub struct Collected(Arc<Mutex<BTreeMap<String, Entry>>>);

fn display(key: &Key) -> String {
    let labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}=\"{}\"", l.key(), l.value()))
        .collect();
    if labels.is_empty() {
        key.name().to_string()
    } else {
        format!("{}{{{}}}", key.name(), labels.join(","))
    }
}

impl Collected {
    /// Installs a recorder that keeps everything here. Before any client is built.
    pub fn install() -> Result<Collected, String> {
        let c = Collected::default();
        metrics::set_global_recorder(c.clone()).map_err(|e| e.to_string())?;
        Ok(c)
    }

    fn entry(
        &self,
        key: &Key,
        make: impl FnOnce() -> Entry,
    ) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(display(key)).or_insert_with(make);
        m
    }

    /// Prints every metric that moved: counters, gauges, and histograms as count, p50, p99
    /// and max (in microseconds, for the `_seconds` ones).
    pub fn print(&self) {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (name, e) in m.iter() {
            match e {
                Entry::Counter(v) if v.load(Ordering::Relaxed) > 0 => {
                    println!("{name} {}", v.load(Ordering::Relaxed));
                }
                Entry::Gauge(v) => println!("{name} {}", f64::from_bits(v.load(Ordering::Relaxed))),
                Entry::Histogram(s) => {
                    let mut v = s.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    if v.is_empty() {
                        continue;
                    }
                    v.sort_by(f64::total_cmp);
                    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)] * 1e6;
                    println!(
                        "{name} count={} p50={:.1}us p99={:.1}us max={:.1}us",
                        v.len(),
                        at(0.5),
                        at(0.99),
                        at(1.0)
                    );
                }
                Entry::Counter(_) => {}
            }
        }
    }
}

impl Recorder for Collected {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let m = self.entry(key, || Entry::Counter(Arc::default()));
        match &m[&display(key)] {
            Entry::Counter(v) => Counter::from_arc(v.clone()),
            _ => Counter::noop(),
        }
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let m = self.entry(key, || Entry::Gauge(Arc::default()));
        match &m[&display(key)] {
            Entry::Gauge(v) => Gauge::from_arc(v.clone()),
            _ => Gauge::noop(),
        }
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let m = self.entry(key, || Entry::Histogram(Arc::default()));
        match &m[&display(key)] {
            Entry::Histogram(v) => Histogram::from_arc(v.clone()),
            _ => Histogram::noop(),
        }
    }
}
