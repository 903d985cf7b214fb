//! Every Prometheus metric digibot exports, and `GET /metrics` (text
//! exposition format 0.0.4).
//!
//! Two kinds of metric:
//!
//! - **Instruments** (counters, gauges, histograms), declared once in the
//!   [`metrics!`] block below and updated where things happen:
//!   `metrics().api_retries.inc()`,
//!   `metrics().webhooks.with(&["accepted"]).inc()`. Every update is one
//!   relaxed atomic add; a labelled family finds its child with a
//!   lock-free read of its label sets (an [`ArcSwap`]) and a short scan, and
//!   takes a lock only the first time a label set is seen. Label sets live
//!   as long as the process (Prometheus expects a series not to vanish), so
//!   label values must be few: plugin names, failure kinds, status codes,
//!   never free text or ids.
//! - **State read at scrape time** ([`scrape`]): outbox depth, dead letters
//!   and plugin states are read from the store and the registry when
//!   Prometheus asks, so they are right after a restart and need no
//!   bookkeeping on the hot paths.
//!
//! ## Adding a metric
//!
//! - A counter, gauge or histogram: one line in the `metrics!` block
//!   below, e.g.
//!   `conversations_archived: Family<Counter> = Family::new("digibot_conversations_archived_total", "Conversations archived, by who.", &["by"]);`
//!   (`Single<Counter>`/`Single<Gauge>` without labels,
//!   `Family::histogram(.., BUCKETS)` for durations), then
//!   `metrics().conversations_archived.with(&["agent"]).inc()` where it
//!   happens. It appears on `/metrics` with its `# HELP`/`# TYPE` lines.
//!   Label sets passed to `preset` in [`Metrics::new`] read `0` before
//!   their first event (do that for small fixed sets, so dashboards and
//!   alerts see the series from the start).
//! - A value read from the store or the registry when Prometheus asks: one
//!   [`gauge`] call in [`scrape`].
//!
//! Names: `digibot_` prefix, `_total` for counters, base units
//! (`_seconds`, `_bytes`). List the metric in docs/operations.md.
//!
//! `/metrics` is protected like the admin API: it exists only when
//! `DIGIBOT_ADMIN_TOKEN` is set, and wants `Authorization: Bearer TOKEN`.

use crate::server::AppState;
use arc_swap::ArcSwap;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

/// Buckets of `digibot_plugin_invocation_seconds`: a warm Rust plugin
/// answers in tens of µs, the default deadline is 100 ms.
pub const INVOCATION_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 1.0,
];

/// Declares [`Metrics`]: one line per instrument, `field: Type =
/// constructor;` (the constructor names the metric, its help and labels).
macro_rules! metrics {
    ($($(#[$doc:meta])* $field:ident: $ty:ty = $make:expr;)+) => {
        /// Every instrument digibot updates; see the module docs.
        pub struct Metrics {
            $($(#[$doc])* pub $field: $ty,)+
        }

        impl Metrics {
            fn declared() -> Metrics {
                Metrics { $($field: $make,)+ }
            }

            /// Every instrument in the exposition format, in declaration order.
            pub fn render(&self, out: &mut String) {
                $(self.$field.render(out);)+
            }
        }
    };
}

metrics! {
    /// `accepted` (recorded, plugins will run), `ignored` (recorded, no
    /// plugin runs: agent or system messages, archived conversations,
    /// unknown events), `duplicate`, `unauthorized`, `malformed`,
    /// `too_large`, `unavailable` (could not be recorded: 503).
    webhooks: Family<Counter> = Family::new("digibot_webhooks_total", "Webhooks received, by outcome.", &["outcome"]);
    /// Every invocation that ran (failed ones too), instance included.
    plugin_invocation_seconds: Family<Histogram> = Family::histogram("digibot_plugin_invocation_seconds", "Time of one plugin invocation, instance included.", &["plugin"], INVOCATION_BUCKETS);
    /// `reason`: [`crate::runtime::Failure::kind`].
    plugin_failures: Family<Counter> = Family::new("digibot_plugin_failures_total", "Plugin invocations that failed, by plugin and reason.", &["plugin", "reason"]);
    /// Committed to the outbox, after validation; `kind`: `Action::kind`.
    actions: Family<Counter> = Family::new("digibot_actions_total", "Actions queued for Digishare, by kind.", &["kind"]);
    /// Refused by validation against Digishare's limits: never sent.
    actions_rejected: Family<Counter> = Family::new("digibot_actions_rejected_total", "Actions refused for breaking a Digishare limit, by kind.", &["kind"]);
    /// One per Messages API attempt: the HTTP status, or `error` when no
    /// answer came (connection error, timeout).
    api_requests: Family<Counter> = Family::new("digibot_api_requests_total", "Messages API requests, by HTTP status or error.", &["status"]);
    api_retries: Single<Counter> = Single::new("digibot_api_retries_total", "Failed Messages API attempts scheduled for a retry.");
    /// PostgreSQL: every statement sent (a first prepare on a connection
    /// counts too); SQLite: every job handed to the writer thread and every
    /// read on a reader connection. Divided by events: the store's cost.
    store_round_trips: Single<Counter> = Single::new("digibot_store_round_trips_total", "Requests to the database (statements to PostgreSQL; writer jobs and reads on SQLite).");
    /// SQLite group commits: one fsync each with durability `full`.
    store_commits: Single<Counter> = Single::new("digibot_store_commits_total", "SQLite transactions committed by the writer (one per group commit).");
    /// A human took a conversation from the bot; `cause`: `hand_off` (a
    /// plugin's hand-off was delivered) or `agent` (an agent wrote).
    takeovers: Family<Counter> = Family::new("digibot_takeovers_total", "Conversations a human took over from the bot, by cause.", &["cause"]);
    /// A conversation left a human's hands; `reason`: `command` (the
    /// agent's release note), `idle`, `admin` (the admin API), `archived`.
    /// `digibot conversations release` runs in its own process: not counted.
    releases: Family<Counter> = Family::new("digibot_releases_total", "Conversations handed back from a human, by reason.", &["reason"]);
    /// Customer messages no plugin answered because a human is in charge.
    skipped_human: Single<Counter> = Single::new("digibot_messages_skipped_human_total", "Customer messages not answered because a human is in charge.");
    /// Pending actions that became dead letters because their conversation
    /// was archived.
    archived_dead_letters: Single<Counter> = Single::new("digibot_archived_dead_letters_total", "Pending actions turned into dead letters by archiving.");
}

/// The process's instruments.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let m = Metrics::declared();
        m.webhooks.preset(&[
            &["accepted"],
            &["ignored"],
            &["duplicate"],
            &["unauthorized"],
            &["malformed"],
            &["too_large"],
            &["unavailable"],
        ]);
        m.takeovers.preset(&[&["hand_off"], &["agent"]]);
        m.releases
            .preset(&[&["command"], &["idle"], &["admin"], &["archived"]]);
        m
    }
}

/// A monotonic count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Durations in fixed buckets (bounds in seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket, not cumulative; one more for `+Inf`.
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn with_bounds(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.partition_point(|&b| b < secs);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// How one kind of instrument writes its samples.
pub trait Instrument {
    const TYPE: &'static str;
    /// Writes the samples of one child; `labels` is `a="x",b="y"` or empty.
    fn samples(&self, name: &str, labels: &str, out: &mut String);
}

impl Instrument for Counter {
    const TYPE: &'static str = "counter";
    fn samples(&self, name: &str, labels: &str, out: &mut String) {
        sample(out, name, labels, self.get());
    }
}

impl Instrument for Gauge {
    const TYPE: &'static str = "gauge";
    fn samples(&self, name: &str, labels: &str, out: &mut String) {
        sample(out, name, labels, self.get());
    }
}

impl Instrument for Histogram {
    const TYPE: &'static str = "histogram";
    fn samples(&self, name: &str, labels: &str, out: &mut String) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(b) => b.to_string(),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        sample(out, &format!("{name}_sum"), labels, sum);
        // The bucket total, not `count`: a scrape racing an `observe` must
        // still see `+Inf == _count`.
        sample(out, &format!("{name}_count"), labels, cumulative);
    }
}

fn sample(out: &mut String, name: &str, labels: &str, value: impl std::fmt::Display) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value escaped for the exposition format.
fn escape(value: &str) -> String {
    let mut s = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// `a="x",b="y"`
fn label_pairs(names: &[&str], values: &[impl AsRef<str>]) -> String {
    names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v.as_ref())))
        .collect::<Vec<_>>()
        .join(",")
}

/// One instrument without labels, with its name and help; derefs to it.
pub struct Single<M> {
    name: &'static str,
    help: &'static str,
    metric: M,
}

impl<M> std::ops::Deref for Single<M> {
    type Target = M;
    fn deref(&self) -> &M {
        &self.metric
    }
}

impl<M: Instrument + Default> Single<M> {
    pub fn new(name: &'static str, help: &'static str) -> Self {
        Single {
            name,
            help,
            metric: M::default(),
        }
    }

    fn render(&self, out: &mut String) {
        header(out, self.name, self.help, M::TYPE);
        self.metric.samples(self.name, "", out);
    }
}

type Children<M> = Vec<(Box<[Box<str>]>, &'static M)>;

/// Instruments of one name, one per label set.
pub struct Family<M: 'static> {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    make: Box<dyn Fn() -> M + Send + Sync>,
    /// Read without locking on every update; replaced (under `grow`) when a
    /// new label set appears. Children are leaked on purpose: they live as
    /// long as the process, so `with` hands out plain references.
    children: ArcSwap<Children<M>>,
    grow: Mutex<()>,
}

impl<M: Instrument + Default + 'static> Family<M> {
    pub fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Self {
        Family::with_maker(name, help, labels, M::default)
    }
}

impl Family<Histogram> {
    /// A histogram family; all children have buckets `bounds` (seconds).
    pub fn histogram(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        bounds: &'static [f64],
    ) -> Self {
        Family::with_maker(name, help, labels, move || Histogram::with_bounds(bounds))
    }
}

impl<M: Instrument + 'static> Family<M> {
    fn with_maker(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        make: impl Fn() -> M + Send + Sync + 'static,
    ) -> Self {
        Family {
            name,
            help,
            labels,
            make: Box::new(make),
            children: ArcSwap::from_pointee(Vec::new()),
            grow: Mutex::new(()),
        }
    }

    /// The instrument for these label values (in the order of the label
    /// names), created at its first use.
    pub fn with(&self, values: &[&str]) -> &M {
        debug_assert_eq!(values.len(), self.labels.len(), "{}", self.name);
        if let Some(m) = find(&self.children.load(), values) {
            return m;
        }
        let _grow = self.grow.lock().unwrap_or_else(|e| e.into_inner());
        // Another thread may have added it while this one waited.
        let current = self.children.load_full();
        if let Some(m) = find(&current, values) {
            return m;
        }
        let child: &'static M = Box::leak(Box::new((self.make)()));
        let mut next = Vec::with_capacity(current.len() + 1);
        next.extend(current.iter().map(|(k, m)| (k.clone(), *m)));
        next.push((values.iter().map(|v| Box::from(*v)).collect(), child));
        self.children.store(Arc::new(next));
        child
    }

    /// Creates these label sets now, so they read 0 before their first event.
    pub fn preset(&self, sets: &[&[&str]]) {
        for values in sets {
            self.with(values);
        }
    }

    fn render(&self, out: &mut String) {
        header(out, self.name, self.help, M::TYPE);
        let mut children: Vec<(String, &M)> = self
            .children
            .load()
            .iter()
            .map(|(values, m)| (label_pairs(self.labels, values), *m))
            .collect();
        children.sort_by(|a, b| a.0.cmp(&b.0));
        for (labels, m) in children {
            m.samples(self.name, &labels, out);
        }
    }
}

fn find<M>(children: &Children<M>, values: &[&str]) -> Option<&'static M> {
    children
        .iter()
        .find(|(k, _)| k.len() == values.len() && k.iter().zip(values).all(|(a, b)| **a == **b))
        .map(|(_, m)| *m)
}

/// A gauge computed at scrape time: its header, then one sample per
/// `(label values, value)`.
pub fn gauge<V: std::fmt::Display>(
    out: &mut String,
    name: &str,
    help: &str,
    labels: &[&str],
    samples: impl IntoIterator<Item = (Vec<String>, V)>,
) {
    header(out, name, help, "gauge");
    for (values, value) in samples {
        sample(out, name, &label_pairs(labels, &values), value);
    }
}

/// The whole exposition: the instruments, then the state read now from
/// the store and the registry.
pub async fn scrape(app: &AppState) -> Result<String, crate::store::StoreError> {
    let mut out = String::with_capacity(8 << 10);
    metrics().render(&mut out);

    let store = app.store.clone();
    let depth = tokio::task::spawn_blocking(move || store.outbox_depth())
        .await
        .map_err(|_| crate::store::StoreError::Closed)??;
    gauge(
        &mut out,
        "digibot_outbox_depth",
        "Actions waiting to be sent (retries included).",
        &[],
        [(vec![], depth.pending)],
    );
    gauge(
        &mut out,
        "digibot_dead_letters",
        "Actions Digishare refused or that ran out of retries, kept for an operator.",
        &[],
        [(vec![], depth.dead)],
    );

    let plugins = app.registry.report();
    gauge(
        &mut out,
        "digibot_plugin_state",
        "1 for the breaker state each plugin is in (active, quarantined, half_open), 0 for the others.",
        &["plugin", "state"],
        plugins.iter().flat_map(|p| {
            ["active", "quarantined", "half_open"].map(|state| {
                let current = p.health.state.replace('-', "_") == state;
                (vec![p.name.clone(), state.to_string()], u8::from(current))
            })
        }),
    );
    gauge(
        &mut out,
        "digibot_plugin_info",
        "1 per loaded plugin: its version (SHA-256 prefix) and WIT version.",
        &["plugin", "version", "wit_version"],
        plugins.iter().map(|p| {
            (
                vec![
                    p.name.clone(),
                    p.version[..12.min(p.version.len())].to_string(),
                    p.wit_version.to_string(),
                ],
                1,
            )
        }),
    );
    Ok(out)
}

/// `GET /metrics` (behind the admin token, see [`crate::server::app`]).
pub async fn handler(axum::extract::State(app): axum::extract::State<AppState>) -> Response {
    match scrape(&app).await {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read the store: {e}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(f: impl FnOnce(&mut String)) -> String {
        let mut out = String::new();
        f(&mut out);
        out
    }

    #[test]
    fn a_counter_family_renders_each_label_set_sorted_with_help_and_type() {
        let family = Family::<Counter>::new("t_total", "Things.", &["outcome", "who"]);
        family.preset(&[&["zero", "x"]]);
        family.with(&["b", "y"]).add(3);
        family.with(&["a", "y"]).inc();
        family.with(&["a", "y"]).inc();
        assert_eq!(
            rendered(|o| family.render(o)),
            "# HELP t_total Things.\n# TYPE t_total counter\n\
             t_total{outcome=\"a\",who=\"y\"} 2\n\
             t_total{outcome=\"b\",who=\"y\"} 3\n\
             t_total{outcome=\"zero\",who=\"x\"} 0\n"
        );
    }

    #[test]
    fn with_returns_the_same_child_for_the_same_labels() {
        let family = Family::<Counter>::new("t_total", "Things.", &["l"]);
        assert!(std::ptr::eq(family.with(&["a"]), family.with(&["a"])));
        assert!(!std::ptr::eq(family.with(&["a"]), family.with(&["b"])));
    }

    #[test]
    fn concurrent_first_uses_of_a_label_set_share_one_child() {
        let family = Arc::new(Family::<Counter>::new("t_total", "Things.", &["l"]));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let family = family.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        family.with(&[["a", "b", "c"][i % 3]]).inc();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let total: u64 = ["a", "b", "c"]
            .iter()
            .map(|l| family.with(&[l]).get())
            .sum();
        assert_eq!(total, 8000);
        assert_eq!(family.children.load().len(), 3);
    }

    #[test]
    fn a_histogram_renders_cumulative_buckets_sum_and_count() {
        static BOUNDS: &[f64] = &[0.001, 0.01];
        let family = Family::histogram("t_seconds", "Time.", &["plugin"], BOUNDS);
        let h = family.with(&["echo"]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(1)); // on a bound: le is inclusive
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(2));
        assert_eq!(h.count(), 4);
        assert_eq!(
            rendered(|o| family.render(o)),
            "# HELP t_seconds Time.\n# TYPE t_seconds histogram\n\
             t_seconds_bucket{plugin=\"echo\",le=\"0.001\"} 2\n\
             t_seconds_bucket{plugin=\"echo\",le=\"0.01\"} 3\n\
             t_seconds_bucket{plugin=\"echo\",le=\"+Inf\"} 4\n\
             t_seconds_sum{plugin=\"echo\"} 2.0065\n\
             t_seconds_count{plugin=\"echo\"} 4\n"
        );
    }

    #[test]
    fn single_instruments_and_scrape_time_gauges() {
        let c = Single::<Counter>::new("t_retries_total", "Retries.");
        c.inc();
        assert_eq!(
            rendered(|o| c.render(o)),
            "# HELP t_retries_total Retries.\n# TYPE t_retries_total counter\nt_retries_total 1\n"
        );
        let out = rendered(|o| {
            gauge(o, "t_depth", "Depth.", &[], [(vec![], 7)]);
            gauge(
                o,
                "t_state",
                "State.",
                &["plugin"],
                [(vec!["a".to_string()], 1)],
            );
        });
        assert_eq!(
            out,
            "# HELP t_depth Depth.\n# TYPE t_depth gauge\nt_depth 7\n\
             # HELP t_state State.\n# TYPE t_state gauge\nt_state{plugin=\"a\"} 1\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let family = Family::<Counter>::new("t_total", "Things.", &["l"]);
        family.with(&["a\"b\\c\nd"]).inc();
        assert!(
            rendered(|o| family.render(o)).contains("t_total{l=\"a\\\"b\\\\c\\nd\"} 1\n"),
            "{}",
            rendered(|o| family.render(o))
        );
    }

    #[test]
    fn every_webhook_outcome_reads_zero_before_its_first_webhook() {
        let out = rendered(|o| Metrics::new().render(o));
        for outcome in [
            "accepted",
            "ignored",
            "duplicate",
            "unauthorized",
            "malformed",
            "too_large",
            "unavailable",
        ] {
            assert!(
                out.contains(&format!(
                    "digibot_webhooks_total{{outcome=\"{outcome}\"}} 0\n"
                )),
                "{outcome}: {out}"
            );
        }
        assert!(out.contains("# TYPE digibot_plugin_invocation_seconds histogram\n"));
        assert!(out.contains("digibot_api_retries_total 0\n"));
    }
}
