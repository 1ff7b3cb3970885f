//! The infra, proven against a real Prometheus: the config, rules and alert unit tests
//! pass promtool; lynx's exposition passes `promtool check metrics`; a real Prometheus
//! scrapes a real lynx-host and every dashboard query returns data.

use std::time::Duration;

use lynx_tests::prom::{dashboard_exprs, first_value, infra, promtool, Prometheus};
use lynx_tests::Server;
use serde_json::json;

const MODEL: &str = "smollm2-135m-instruct";

#[test]
fn promtool_accepts_the_config_rules_and_alert_tests() {
    for args in [
        vec!["check", "config", "prometheus.yml"],
        vec!["check", "rules", "rules.yml", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
    ] {
        let (ok, out) = promtool(&args, None);
        assert!(ok, "promtool {args:?} failed:\n{out}");
    }
}

#[tokio::test]
async fn promtool_check_metrics_finds_no_problem() {
    let server = Server::start().await;
    let (status, _) = server
        .post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}))
        .await;
    assert_eq!(status, 200);
    let text = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (ok, out) = promtool(&["check", "metrics"], Some(&text));
    assert!(
        ok && out.trim().is_empty(),
        "promtool check metrics:\n{out}"
    );
}

#[tokio::test]
async fn prometheus_scrapes_lynx_and_every_dashboard_query_returns_data() {
    let server = Server::start().await;
    let target = server.base.trim_start_matches("http://").to_string();
    let prometheus = Prometheus::start(&target).await;

    let within = Duration::from_secs(30);
    // Traffic only after the first scrape, and in two phases with a scrape between
    // them: a rate needs two samples of a series, and an increase between them.
    let up = prometheus
        .query_until_data(r#"up{job="lynx"} == 1"#, within)
        .await;
    assert_eq!(
        first_value(&up),
        Some(1.0),
        "target not up:\n{}",
        prometheus.log()
    );
    for phase in 1..=2 {
        for i in 0..10 {
            let (status, body) = server
                .post(
                    "/v1/completions",
                    &json!({"prompt": format!("Count to {i}:"), "max_tokens": 3}),
                )
                .await;
            assert_eq!(status, 200, "{body}");
        }
        for bad in [
            json!({"prompt": ""}),
            json!({"prompt": "x", "max_tokens": 0}),
            json!({"prompt": "x", "n": 17}),
        ] {
            let (status, _) = server.post("/v1/completions", &bad).await;
            assert_eq!(status, 400);
        }
        let want = f64::from(10 * phase);
        let ok = prometheus
            .query_until(
                r#"sum(request_total{status="200",endpoint="/v1/completions"})"#,
                within,
                |r| first_value(r) == Some(want),
            )
            .await;
        assert_eq!(first_value(&ok), Some(want), "phase {phase}");
    }
    let bad = prometheus
        .query_until_data(r#"sum(request_total{status="400"})"#, within)
        .await;
    assert_eq!(first_value(&bad), Some(6.0));
    let p95 = prometheus
        .query_until_finite(
            "histogram_quantile(0.95, sum by (le) (rate(request_duration_seconds_bucket[1m])))",
            within,
        )
        .await;
    assert!(p95.is_some_and(|p| p > 0.0), "p95 = {p95:?}");

    // The dashboard's model variable finds the model.
    assert_eq!(
        prometheus.label_values("model_name", "tokens_total").await,
        vec![MODEL.to_string()]
    );

    let exprs = dashboard_exprs(&infra("grafana/dashboards/llm.json"));
    assert!(exprs.len() >= 8, "{exprs:?}");
    for (title, expr) in exprs {
        let query = expr
            .replace("$__rate_interval", "1m")
            .replace("$model_name", MODEL);
        assert!(
            !query.contains('$'),
            "unsubstituted variable in {title:?}: {query}"
        );
        let result = prometheus.query_until_data(&query, within).await;
        assert!(
            !result.is_empty(),
            "panel {title:?} returned no data: {query}"
        );
    }
}
