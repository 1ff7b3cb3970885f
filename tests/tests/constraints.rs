//! Token-level plugins as a user meets them: whole and streamed answers are the same,
//! constrained and unconstrained requests batched together leave each other's answers
//! unchanged, forced tokens skip forwards and count as completion tokens, bad formats
//! and plugins without the interface are 400s with the reason, a constraint that traps,
//! spins or rules nonsense fails its own request only, and the structured-output plugin
//! hot-swaps like any other.

use lynx_tests::swap::{admin_until, test_plugin, PluginDir};
use lynx_tests::{answer_text, plugins_dist, Server};
use serde_json::{json, Value};

fn chat(content: &str) -> Value {
    json!({"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 64})
}

fn person_schema() -> Value {
    json!({"type": "json_schema", "json_schema": {"name": "person", "strict": true, "schema": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "city": {"enum": ["Paris", "London", "Rome"]}
        },
        "required": ["name", "age", "city"],
        "additionalProperties": false
    }}})
}

fn with(mut body: Value, key: &str, value: Value) -> Value {
    body[key] = value;
    body
}

/// The text of a streamed answer, from its chunks' deltas.
fn streamed_text(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .map(|v| {
            let c = &v["choices"][0];
            c["delta"]["content"]
                .as_str()
                .or_else(|| c["text"].as_str())
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn streamed_and_whole_answers_are_the_same_and_forced_tokens_are_counted() {
    let server = Server::start().await;
    let formats = [
        ("response_format", person_schema()),
        ("response_format", json!({"type": "json_object"})),
        ("guided_regex", json!(r"\d{3}-\d{4}")),
        ("guided_choice", json!(["north", "south", "east", "west"])),
    ];
    for (key, format) in formats {
        for (path, body) in [
            ("/v1/chat/completions", chat("Describe a person in JSON.")),
            (
                "/v1/completions",
                json!({"prompt": "A person, as JSON:", "temperature": 0, "max_tokens": 64}),
            ),
        ] {
            let body = with(body, key, format.clone());
            let before = server.metrics().await;
            let (status, whole) = server.post(path, &body).await;
            assert_eq!(status, 200, "{whole}");
            let after = server.metrics().await;
            let tokens = whole["usage"]["completion_tokens"].as_u64().expect("usage");
            let counted = after.value("tokens_total", &[("kind", "completion")])
                - before.value("tokens_total", &[("kind", "completion")]);
            assert_eq!(counted as u64, tokens, "{path} {key}: {whole}");

            let events = server
                .stream(path, &with(body, "stream", json!(true)))
                .await;
            assert_eq!(streamed_text(&events), answer_text(&whole), "{path} {key}");
        }
    }
}

#[tokio::test]
async fn max_tokens_cuts_a_forced_run_at_its_count() {
    let server = Server::start().await;
    for max in [1, 2, 3, 5] {
        let body = with(chat("A person."), "response_format", person_schema());
        let body = with(body, "max_tokens", json!(max));
        let (status, answer) = server.post("/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["usage"]["completion_tokens"], max, "{answer}");
        assert_eq!(answer["choices"][0]["finish_reason"], "length", "{answer}");
        assert!(answer_text(&answer).starts_with('{'), "{answer}");
    }
}

#[tokio::test]
async fn constrained_and_unconstrained_requests_batched_leave_each_other_unchanged() {
    let server = Server::start().await;
    let free: Vec<Value> = ["Tell me about Paris.", "Count to ten.", "Name three birds."]
        .iter()
        .map(|p| chat(p))
        .collect();
    let bound: Vec<Value> = [
        with(chat("A person."), "response_format", person_schema()),
        with(
            chat("A phone number."),
            "guided_regex",
            json!(r"\(\d{3}\) \d{3}-\d{4}"),
        ),
        with(
            chat("Pick a color."),
            "guided_choice",
            json!(["red", "green", "blue"]),
        ),
    ]
    .into();
    let path = "/v1/chat/completions";
    let mut alone = Vec::new();
    for body in free.iter().chain(&bound) {
        let (status, answer) = server.post(path, body).await;
        assert_eq!(status, 200, "{answer}");
        alone.push(answer_text(&answer));
    }
    let together = futures_util::future::join_all(
        free.iter()
            .chain(&bound)
            .map(|body| async { server.post(path, body).await }),
    )
    .await;
    for (i, (status, answer)) in together.iter().enumerate() {
        assert_eq!(*status, 200, "{answer}");
        assert_eq!(
            answer_text(answer),
            alone[i],
            "request {i} changed when batched"
        );
    }
}

#[tokio::test]
async fn forced_tokens_take_fewer_forwards_than_tokens() {
    let server = Server::start_with(&["--log", "info,lynx_engine::sequence=debug"]).await;
    let body = with(chat("A person."), "response_format", person_schema());
    let (status, answer) = server.post("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    let (status, free) = server
        .post("/v1/chat/completions", &chat("A person."))
        .await;
    assert_eq!(status, 200, "{free}");
    // One line per sequence: `generated=N forwards=M constrained=B`.
    let log = server.log();
    let figure = |line: &str, key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line}"))
    };
    let ended: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("sequence ended"))
        .collect();
    assert_eq!(ended.len(), 2, "{log}");
    let (c, u) = (ended[0], ended[1]);
    assert!(
        c.contains("constrained=true") && u.contains("constrained=false"),
        "{log}"
    );
    assert_eq!(
        figure(c, "generated"),
        answer["usage"]["completion_tokens"].as_u64().unwrap()
    );
    // The keys and punctuation of the JSON are forced: appended in chunks.
    assert!(
        figure(c, "forwards") * 2 < figure(c, "generated"),
        "constrained: {c}"
    );
    // Free text takes a forward per token (plus the prompt's).
    assert!(figure(u, "forwards") > figure(u, "generated"), "free: {u}");
}

#[tokio::test]
async fn bad_formats_are_client_errors_with_the_reason() {
    let server = Server::start().await;
    let cases = [
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}}),
            "invalid_schema",
            "missing",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                "schema": {"type": "string", "minLength": 5, "maxLength": 2}}}}),
            "invalid_schema",
            "",
        ),
        (json!({"guided_regex": "(unclosed"}), "invalid_regex", ""),
        (
            json!({"response_format": {"type": "yaml"}}),
            "",
            "response_format.type",
        ),
        (
            json!({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}),
            "",
            "Only one output format",
        ),
    ];
    for (format, code, says) in cases {
        let mut body = chat("Hi");
        for (k, v) in format.as_object().expect("object") {
            body[k] = v.clone();
        }
        let (status, answer) = server.post("/v1/chat/completions", &body).await;
        assert_eq!(status, 400, "{format}: {answer}");
        assert_eq!(answer["error"]["type"], "invalid_request_error", "{answer}");
        if !code.is_empty() {
            assert_eq!(answer["error"]["code"], code, "{answer}");
        }
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{format}: {message}");
    }
    let (status, answer) = server.post("/v1/chat/completions", &chat("Hi")).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn plugins_without_the_interface_refuse_structured_outputs_with_a_400() {
    let dir = plugins_dist().join("test");
    let dir = dir.to_str().expect("utf-8");
    let format = json!({"type": "json_object"});
    for (plugin, version) in [("legacy", "0.1.0"), ("legacy2", "0.2.0")] {
        let server = Server::start_with(&["--plugins-dir", dir, "--plugin", plugin]).await;
        let body = with(chat("Hi"), "response_format", format.clone());
        let (status, answer) = server.post("/v1/chat/completions", &body).await;
        assert_eq!(status, 400, "{plugin}: {answer}");
        assert_eq!(
            answer["error"]["code"], "response_format_unsupported",
            "{answer}"
        );
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(plugin) && message.contains(version),
            "{message}"
        );
        let (status, answer) = server.post("/v1/chat/completions", &chat("Hi")).await;
        assert_eq!(status, 200, "{plugin} still serves: {answer}");
    }
    // A 0.3.0 plugin that exports the interface but serves no format says so itself.
    let strict = Server::start_with(&["--plugin", "strict"]).await;
    let body = with(chat("Hi"), "response_format", format);
    let (status, answer) = strict.post("/v1/chat/completions", &body).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(
        answer["error"]["code"], "response_format_unsupported",
        "{answer}"
    );
}

#[tokio::test]
async fn a_failing_constraint_fails_its_own_request_and_no_other() {
    let dir = plugins_dist().join("test");
    let server = Server::start_with(&[
        "--plugins-dir",
        dir.to_str().expect("utf-8"),
        "--plugin",
        "hostile",
        "--plugin-timeout-ms",
        "200",
    ])
    .await;
    let path = "/v1/completions";
    let free = json!({"prompt": "The capital of France is", "temperature": 0, "max_tokens": 24});
    let (status, alone) = server.post(path, &free).await;
    assert_eq!(status, 200, "{alone}");
    for (word, code) in [
        ("TRAP", "plugin_trap"),
        ("SPIN", "plugin_timeout"),
        ("JUNK", "plugin_invalid_result"),
        ("NOTHING", "plugin_invalid_result"),
    ] {
        let bad =
            json!({"prompt": "Hello", "temperature": 0, "max_tokens": 24, "guided_regex": word});
        let (a, b, c) = tokio::join!(
            server.post(path, &free),
            server.post(path, &bad),
            server.post(path, &free)
        );
        for (status, answer) in [&a, &c] {
            assert_eq!(*status, 200, "{word}: {answer}");
            assert_eq!(
                answer_text(answer),
                answer_text(&alone),
                "{word} changed another answer"
            );
        }
        let (status, answer) = b;
        assert_eq!(status, 500, "{word}: {answer}");
        assert_eq!(answer["error"]["type"], "plugin_error", "{answer}");
        assert_eq!(answer["error"]["code"], code, "{word}: {answer}");
    }
    // A well-behaved constrained request on the same plugin still serves.
    let fine = json!({"prompt": "Hello", "temperature": 0, "max_tokens": 8, "guided_regex": "ANY"});
    let (status, answer) = server.post(path, &fine).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(server.health_status().await, 200);
}

#[tokio::test]
async fn the_structured_output_plugin_hot_swaps_like_any_other() {
    let default = std::fs::read(plugins_dist().join("default.wasm")).expect("default.wasm");
    let dir = PluginDir::new();
    dir.install("main", &default);
    let server = Server::start_with(&[
        "--plugins-dir",
        dir.path(),
        "--plugin",
        "main",
        "--plugin-warm-constraints",
        "2",
    ])
    .await;
    // The admin view says it serves structured outputs, and the prewarmer fills its pool.
    let e = admin_until(&server, "main", |e| e["warm_constraints"] == 2).await;
    assert_eq!(e["structured_outputs"], true, "{e}");
    let body = with(chat("A person."), "response_format", person_schema());
    let path = "/v1/chat/completions";
    let (status, first) = server.post(path, &body).await;
    assert_eq!(status, 200, "{first}");
    let person: Value = serde_json::from_str(&answer_text(&first)).expect("JSON");
    assert!(person["age"].is_u64(), "{person}");

    // Swapped for a 0.2.0 plugin: structured outputs are refused, text still served.
    dir.install("main", &test_plugin("legacy2.wasm"));
    let e = admin_until(&server, "main", |e| e["wit_version"] == "0.2.0").await;
    assert_eq!(e["structured_outputs"], false, "{e}");
    let (status, answer) = server.post(path, &body).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "response_format_unsupported");

    // And back: the same answer as before the swap.
    dir.install("main", &default);
    admin_until(&server, "main", |e| e["wit_version"] == "0.3.0").await;
    let (status, again) = server.post(path, &body).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(answer_text(&again), answer_text(&first));
}
