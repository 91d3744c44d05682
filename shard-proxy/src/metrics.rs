//! Prometheus metrics of the proxy (served on `metrics_listen`, default 9930).
//!
//! Why: operators need per-shard query rates, latencies, errors and pool pressure to see a
//! slow or failing shard before users do. Counters are updated on the hot path (cheap
//! atomics); pool gauges are refreshed by a periodic task from the pools' own counters.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabel {
    pub shard: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub shard: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// How a statement was routed: the `route` label of `taskflow_shard_proxy_routes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// To one shard.
    One = 0,
    /// A write on several shards.
    Broadcast = 1,
    /// A read on several shards, merged.
    Scatter = 2,
    /// `COPY FROM STDIN` split by key over the shards.
    CopySplit = 3,
}

impl Route {
    const ALL: [Route; 4] = [
        Route::One,
        Route::Broadcast,
        Route::Scatter,
        Route::CopySplit,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Route::One => "one",
            Route::Broadcast => "broadcast",
            Route::Scatter => "scatter",
            Route::CopySplit => "copy_split",
        }
    }
}

/// One shard's statement counter and latency histogram. Clones share the series, so a
/// pool looks them up once instead of hashing and allocating a label on every statement.
#[derive(Clone, Debug)]
pub struct ShardSeries {
    queries: Counter,
    latency: Histogram,
}

impl ShardSeries {
    /// Counts one statement that took `seconds` on the shard.
    pub fn observe(&self, seconds: f64) {
        self.queries.inc();
        self.latency.observe(seconds);
    }
}

/// All metrics; cheap to clone handles are inside.
pub struct Metrics {
    pub queries: Family<ShardLabel, Counter>,
    pub latency: Family<ShardLabel, Histogram, fn() -> Histogram>,
    pub errors: Family<ErrorLabel, Counter>,
    pub routes: Family<RouteLabel, Counter>,
    /// `routes`' series by [`Route`], created up front: counting a route on every
    /// statement must not hash and allocate a label.
    route_counts: [Counter; 4],
    pub pool_in_use: Family<ShardLabel, Gauge>,
    pub pool_idle: Family<ShardLabel, Gauge>,
    pub pool_waiting: Family<ShardLabel, Gauge>,
    pub shard_up: Family<ShardLabel, Gauge>,
    pub clients: Gauge,
    pub two_phase_commits: Counter,
    pub two_phase_aborts: Counter,
    pub in_doubt_resolved: Counter,
    /// Rows moved by online migrations (this proxy as owner).
    pub reshard_rows: Counter,
    /// Write pause of each migration batch (lock to commit), seconds.
    pub reshard_pause: Histogram,
    /// Statements that failed their migration guard (moved or still moving).
    pub reshard_guard_failures: Counter,
}

/// `routes`' series for every [`Route`], in [`Route`] order.
fn route_series(routes: &Family<RouteLabel, Counter>) -> [Counter; 4] {
    Route::ALL.map(|r| {
        routes
            .get_or_create(&RouteLabel {
                route: r.label().to_owned(),
            })
            .clone()
    })
}

impl Metrics {
    /// Creates the metrics and registers them in a new registry.
    pub fn new() -> (Metrics, Registry) {
        let routes = Family::<RouteLabel, Counter>::default();
        let route_counts = route_series(&routes);
        let m = Metrics {
            queries: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            errors: Family::default(),
            routes,
            route_counts,
            pool_in_use: Family::default(),
            pool_idle: Family::default(),
            pool_waiting: Family::default(),
            shard_up: Family::default(),
            clients: Gauge::default(),
            two_phase_commits: Counter::default(),
            two_phase_aborts: Counter::default(),
            in_doubt_resolved: Counter::default(),
            reshard_rows: Counter::default(),
            reshard_pause: latency_histogram(),
            reshard_guard_failures: Counter::default(),
        };
        let registry = m.registry();
        (m, registry)
    }

    /// A registry exporting every metric under the `taskflow_shard_proxy` prefix.
    fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("taskflow_shard_proxy");
        r.register(
            "queries",
            "Statements sent to each shard",
            self.queries.clone(),
        );
        r.register(
            "query_duration_seconds",
            "Time from sending a statement to a shard until its last response",
            self.latency.clone(),
        );
        r.register("errors", "Errors by shard and kind", self.errors.clone());
        r.register(
            "routes",
            "Statements by routing decision",
            self.routes.clone(),
        );
        r.register(
            "pool_in_use",
            "Server connections checked out",
            self.pool_in_use.clone(),
        );
        r.register(
            "pool_idle",
            "Idle server connections",
            self.pool_idle.clone(),
        );
        r.register(
            "pool_waiting",
            "Clients waiting for a server connection",
            self.pool_waiting.clone(),
        );
        r.register(
            "shard_up",
            "1 when the last connect to the shard succeeded",
            self.shard_up.clone(),
        );
        r.register("clients", "Connected clients", self.clients.clone());
        r.register(
            "two_phase_commits",
            "Cross-shard transactions committed with 2PC",
            self.two_phase_commits.clone(),
        );
        r.register(
            "two_phase_aborts",
            "Cross-shard transactions rolled back during 2PC",
            self.two_phase_aborts.clone(),
        );
        r.register(
            "in_doubt_resolved",
            "Prepared transactions resolved by recovery",
            self.in_doubt_resolved.clone(),
        );
        r.register(
            "reshard_rows_moved",
            "Rows moved between shards by online migrations driven by this proxy",
            self.reshard_rows.clone(),
        );
        r.register(
            "reshard_write_pause_seconds",
            "Write pause of each migration batch, from locking its arcs to its commit",
            self.reshard_pause.clone(),
        );
        r.register(
            "reshard_guard_failures",
            "Statements on moving keys refused by their shard's guard (retryable, 40001)",
            self.reshard_guard_failures.clone(),
        );
        r
    }

    /// `shard`'s query counter and latency histogram, for a caller to keep (see
    /// [`ShardSeries`]).
    pub fn shard_series(&self, shard: &str) -> ShardSeries {
        let l = ShardLabel {
            shard: shard.to_owned(),
        };
        ShardSeries {
            queries: self.queries.get_or_create(&l).clone(),
            latency: self.latency.get_or_create(&l).clone(),
        }
    }

    pub fn error(&self, shard: &str, kind: &str) {
        self.errors
            .get_or_create(&ErrorLabel {
                shard: shard.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Counts one statement routed `route`.
    pub fn route(&self, route: Route) {
        self.route_counts[route as usize].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::{Metrics, Route};

    fn exposition(registry: &prometheus_client::registry::Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).expect("encodes");
        out
    }

    /// The handles kept for the hot path must be the registered series, not copies.
    #[test]
    fn kept_handles_count_in_the_exported_series() {
        let (m, registry) = Metrics::new();
        m.route(Route::One);
        m.route(Route::One);
        m.route(Route::Scatter);
        let shard = m.shard_series("shard-1");
        shard.observe(0.002);
        m.shard_series("shard-1").observe(0.004);
        let text = exposition(&registry);
        assert!(
            text.contains(r#"taskflow_shard_proxy_routes_total{route="one"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"taskflow_shard_proxy_routes_total{route="scatter"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"taskflow_shard_proxy_routes_total{route="copy_split"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"taskflow_shard_proxy_queries_total{shard="shard-1"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"taskflow_shard_proxy_query_duration_seconds_count{shard="shard-1"} 2"#
            ),
            "{text}"
        );
    }
}
