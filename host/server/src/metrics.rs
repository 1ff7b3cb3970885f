//! Every metric lynx exposes, in one place: name, help, labels, buckets. These six are a
//! contract (see docs/operations.md's table): exactly these families, in the default registry,
//! with bounded label values. Gauges are set from live scheduler state at scrape time.

use std::sync::LazyLock;

use prometheus::{
    register_histogram_vec, register_int_counter_vec, register_int_gauge, Encoder, HistogramVec,
    IntCounterVec, IntGauge, TextEncoder,
};

use lynx_engine::scheduler::SchedulerStats;

/// LLM request latency: sub-second to two minutes (+Inf is implicit).
pub const LLM_LATENCY_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];
/// Time to first token (+Inf is implicit).
pub const TTFT_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0];

/// The `endpoint` value of every request no route matched.
pub const UNMATCHED_ENDPOINT: &str = "unmatched";

// Registration can only fail on a duplicate or malformed definition, which these fixed
// definitions never are: a failure is a build defect, caught by the first test.
#[allow(clippy::expect_used)]
pub static REQUEST_TOTAL: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "request_total",
        "HTTP requests served, by endpoint, method and status.",
        &["endpoint", "method", "status"]
    )
    .expect("request_total registers")
});

#[allow(clippy::expect_used)]
pub static REQUEST_DURATION_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "request_duration_seconds",
        "HTTP request duration in seconds, from arrival to the last byte of the body.",
        &["endpoint", "method"],
        LLM_LATENCY_BUCKETS.to_vec()
    )
    .expect("request_duration_seconds registers")
});

#[allow(clippy::expect_used)]
pub static TOKENS_TOTAL: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tokens_total",
        "Tokens processed, by kind (prompt or completion) and model.",
        &["kind", "model_name"]
    )
    .expect("tokens_total registers")
});

#[allow(clippy::expect_used)]
pub static TIME_TO_FIRST_TOKEN_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "time_to_first_token_seconds",
        "Seconds from a request's arrival to its first completion token.",
        &["model_name"],
        TTFT_BUCKETS.to_vec()
    )
    .expect("time_to_first_token_seconds registers")
});

#[allow(clippy::expect_used)]
pub static KV_CACHE_SLOTS_USED: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "kv_cache_slots_used",
        "KV cache slots holding a running sequence."
    )
    .expect("kv_cache_slots_used registers")
});

#[allow(clippy::expect_used)]
pub static QUEUE_DEPTH: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("queue_depth", "Requests waiting for a KV cache slot.")
        .expect("queue_depth registers")
});

/// Registers all six families and creates the model's series, so a scrape shows them
/// before the first request.
pub fn init(model_name: &str) {
    LazyLock::force(&REQUEST_TOTAL);
    LazyLock::force(&REQUEST_DURATION_SECONDS);
    for kind in ["prompt", "completion"] {
        TOKENS_TOTAL.with_label_values(&[kind, model_name]);
    }
    TIME_TO_FIRST_TOKEN_SECONDS.with_label_values(&[model_name]);
    LazyLock::force(&KV_CACHE_SLOTS_USED);
    LazyLock::force(&QUEUE_DEPTH);
}

/// The two RED observations for one finished request.
/// `status` is a code the server itself produced, so the label set stays bounded.
pub fn record_request(endpoint: &str, method: &str, status: &str, seconds: f64) {
    let method = method_label(method);
    REQUEST_TOTAL
        .with_label_values(&[endpoint, method, status])
        .inc();
    REQUEST_DURATION_SECONDS
        .with_label_values(&[endpoint, method])
        .observe(seconds);
}

pub fn record_prompt_tokens(model_name: &str, n: usize) {
    TOKENS_TOTAL
        .with_label_values(&["prompt", model_name])
        .inc_by(n as u64);
}

pub fn record_completion_token(model_name: &str) {
    TOKENS_TOTAL
        .with_label_values(&["completion", model_name])
        .inc();
}

pub fn record_ttft(model_name: &str, seconds: f64) {
    TIME_TO_FIRST_TOKEN_SECONDS
        .with_label_values(&[model_name])
        .observe(seconds);
}

/// Method label: the standard methods as themselves, anything else (hyper accepts any
/// token as a method) folded into one value so clients cannot grow the label set.
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "other",
    }
}

/// The text exposition of the default registry, gauges read from `stats` now.
pub fn render(stats: &SchedulerStats) -> Result<String, prometheus::Error> {
    KV_CACHE_SLOTS_USED.set(stats.slots_used() as i64);
    QUEUE_DEPTH.set(stats.queue_depth() as i64);
    let mut buf = Vec::new();
    TextEncoder::new().encode(&prometheus::gather(), &mut buf)?;
    String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
}
