//! Structured outputs, decided token by token by the default plugin's constraint
//! (llguidance in the sandbox): every answer that ends with `finish_reason: stop`
//! matches its JSON schema (`tests/data/schemas.json`, checked with the `jsonschema`
//! crate), its regular expression or one of its choices, greedy and sampled, on
//! SmolLM2 (chat) and gemma-3-270m (completions). Streamed and whole answers are the
//! same; constrained and unconstrained requests batched together leave each other's
//! answers unchanged; forced tokens are appended without a forward each, and count as
//! completion tokens.

use futures_util::stream::{self, StreamExt};
use lynx_tests::{answer_text, cached_model, workspace_root, Server};
use serde_json::{json, Value};

/// How many requests run at once: a batch, as clients would send them.
const CONCURRENCY: usize = 8;

struct Case {
    name: String,
    task: String,
    schema: Value,
}

fn corpus() -> Vec<Case> {
    let path = workspace_root().join("tests/data/schemas.json");
    let all: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("schemas")).expect("json");
    all.into_iter()
        .map(|c| Case {
            name: c["name"].as_str().expect("name").to_string(),
            task: c["task"].as_str().expect("task").to_string(),
            schema: c["schema"].clone(),
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Route {
    /// `/v1/chat/completions` (SmolLM2, which has a chat template).
    Chat,
    /// `/v1/completions` (gemma-3-270m, a base model).
    Text,
}

async fn smollm2(extra: &[&str]) -> Server {
    Server::start_with(extra).await
}

async fn gemma(extra: &[&str]) -> Server {
    let model = cached_model("gemma-3-270m-q4_k_m.gguf", "scripts/fetch-model.sh gemma3");
    let mut args = vec!["--model", model.to_str().expect("utf-8"), "--kv-slots", "8"];
    args.extend(extra);
    Server::start_with(&args).await
}

/// A request for `task` under `format` (the body's format fields), greedy or sampled.
fn request(route: Route, task: &str, format: Value, sampled: bool) -> (&'static str, Value) {
    let mut body = match route {
        Route::Chat => json!({
            "messages": [{"role": "user", "content": format!("Answer in JSON: {task}.")}],
        }),
        Route::Text => json!({"prompt": format!("Question: {task}?\nAnswer in JSON: ")}),
    };
    body["max_tokens"] = json!(160);
    if sampled {
        body["temperature"] = json!(0.8);
        body["seed"] = json!(7);
    } else {
        body["temperature"] = json!(0);
    }
    for (k, v) in format.as_object().expect("format fields") {
        body[k] = v.clone();
    }
    let path = match route {
        Route::Chat => "/v1/chat/completions",
        Route::Text => "/v1/completions",
    };
    (path, body)
}

/// Runs every request, `CONCURRENCY` at a time; each answer with its label.
async fn run_all(
    server: &Server,
    requests: Vec<(String, &'static str, Value)>,
) -> Vec<(String, u16, Value)> {
    stream::iter(requests)
        .map(|(label, path, body)| async move {
            let (status, answer) = server.post(path, &body).await;
            (label, status, answer)
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await
}

/// Every answer is 200; every one that stopped matches; most stopped (a corpus of
/// answers cut by `max_tokens` would prove nothing).
fn check(answers: &[(String, u16, Value)], matches: impl Fn(&str, &str) -> Result<(), String>) {
    let mut stopped = 0;
    let mut failures = Vec::new();
    for (label, status, body) in answers {
        assert_eq!(*status, 200, "{label}: {body}");
        let reason = body["choices"][0]["finish_reason"]
            .as_str()
            .unwrap_or_default();
        if reason != "stop" {
            continue;
        }
        stopped += 1;
        if let Err(e) = matches(label, &answer_text(body)) {
            failures.push(format!("{label}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "answers that do not match:\n{}",
        failures.join("\n")
    );
    assert!(
        stopped * 10 >= answers.len() * 8,
        "only {stopped} of {} answers ended with `stop`",
        answers.len()
    );
}

async fn schemas_validate(server: &Server, route: Route) {
    let cases = corpus();
    assert!(
        cases.len() >= 40,
        "the corpus holds {} schemas",
        cases.len()
    );
    let mut requests = Vec::new();
    for case in &cases {
        for sampled in [false, true] {
            let format = json!({"response_format": {"type": "json_schema", "json_schema": {
                "name": case.name, "schema": case.schema, "strict": true}}});
            let (path, body) = request(route, &case.task, format, sampled);
            let label = format!(
                "{}/{}",
                case.name,
                if sampled { "sampled" } else { "greedy" }
            );
            requests.push((label, path, body));
        }
    }
    let answers = run_all(server, requests).await;
    check(&answers, |label, text| {
        let name = label.split('/').next().unwrap_or_default();
        let case = cases
            .iter()
            .find(|c| c.name == name)
            .ok_or("no such case")?;
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON ({e}): {text:?}"))?;
        let validator = jsonschema::validator_for(&case.schema)
            .map_err(|e| format!("the test's schema is invalid: {e}"))?;
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| e.to_string())
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!("{text} breaks the schema: {}", errors.join("; ")))
        }
    });
}

#[tokio::test]
async fn every_json_schema_answer_validates_on_smollm2() {
    let server = smollm2(&[]).await;
    schemas_validate(&server, Route::Chat).await;
}

#[tokio::test]
async fn every_json_schema_answer_validates_on_gemma() {
    let server = gemma(&[]).await;
    schemas_validate(&server, Route::Text).await;
}

const REGEXES: [(&str, &str); 10] = [
    ("a US phone number", r"\(\d{3}\) \d{3}-\d{4}"),
    ("a date", r"20\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"),
    ("a capitalized first name", r"[A-Z][a-z]{2,8}"),
    ("yes or no", r"(yes|no)"),
    ("a price", r"\d{1,3}\.\d{2}"),
    ("an IPv4 address", r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"),
    ("an email address", r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)"),
    ("a hex color", r"#[0-9a-f]{6}"),
    ("a short sentence", r"[A-Z][a-z]{1,10}( [a-z]{1,10}){1,4}\."),
    ("a time of day", r"([01]\d|2[0-3]):[0-5]\d"),
];

const CHOICES: [(&str, &[&str]); 6] = [
    ("is the sun hot", &["yes", "no"]),
    ("the color of grass", &["red", "green", "blue"]),
    (
        "the capital of France",
        &["Paris", "London", "Berlin", "Madrid"],
    ),
    (
        "the sentiment of 'I love it'",
        &["positive", "negative", "neutral"],
    ),
    ("the first letter", &["A", "B", "C", "D"]),
    ("a word for a feline", &["cat", "category", "catalog"]),
];

async fn regexes_and_choices_match(server: &Server, route: Route) {
    let mut requests = Vec::new();
    for (i, (task, regex)) in REGEXES.iter().enumerate() {
        for sampled in [false, true] {
            let (path, body) = request(route, task, json!({"guided_regex": regex}), sampled);
            requests.push((format!("regex{i}/{sampled}"), path, body));
        }
    }
    for (i, (task, choices)) in CHOICES.iter().enumerate() {
        for sampled in [false, true] {
            let (path, body) = request(route, task, json!({"guided_choice": choices}), sampled);
            requests.push((format!("choice{i}/{sampled}"), path, body));
        }
    }
    let answers = run_all(server, requests).await;
    check(&answers, |label, text| {
        let (kind, _) = label.split_once('/').ok_or("label")?;
        if let Some(i) = kind.strip_prefix("regex") {
            let i: usize = i.parse().map_err(|_| "label")?;
            let whole =
                regex::Regex::new(&format!("^(?:{})$", REGEXES[i].1)).map_err(|e| e.to_string())?;
            if whole.is_match(text) {
                return Ok(());
            }
            return Err(format!("{text:?} does not match {}", REGEXES[i].1));
        }
        let i: usize = kind
            .trim_start_matches("choice")
            .parse()
            .map_err(|_| "label")?;
        if CHOICES[i].1.contains(&text) {
            Ok(())
        } else {
            Err(format!("{text:?} is not one of {:?}", CHOICES[i].1))
        }
    });
}

#[tokio::test]
async fn regex_and_choice_answers_match_on_smollm2() {
    let server = smollm2(&[]).await;
    regexes_and_choices_match(&server, Route::Chat).await;
}

#[tokio::test]
async fn regex_and_choice_answers_match_on_gemma() {
    let server = gemma(&[]).await;
    regexes_and_choices_match(&server, Route::Text).await;
}
