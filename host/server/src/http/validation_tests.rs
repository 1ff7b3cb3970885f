//! Validation, case by case: each refusal names its parameter.

use super::super::requests::{fields, parse_body};
use super::*;

fn parse<T: serde::de::DeserializeOwned>(json: &[u8]) -> Result<T, ApiError> {
    fields(&parse_body(json)?)
}

/// The limits of a server started without flags.
fn default_limits() -> Limits {
    use clap::Parser;
    crate::config::Cli::parse_from(["lynx-host"])
        .config
        .limits()
}

fn common(json: &str) -> Result<Validated, ApiError> {
    parse::<CommonParams>(json.as_bytes())?.validate("m", &default_limits(), Scoring::default())
}

#[test]
fn errors_name_the_field_at_fault() {
    let err = parse::<CommonParams>(br#"{"prompt":"x","max_tokens":"ten"}"#).unwrap_err();
    assert!(err.to_string().contains("max_tokens"), "{err}");
    let err = parse::<CompletionRequest>(b"{not json").unwrap_err();
    assert!(err.to_string().contains("not valid JSON"), "{err}");
    let err = parse::<CompletionRequest>(b"{}").unwrap_err();
    assert!(err.to_string().contains("prompt"), "{err}");
    let err = parse::<CompletionRequest>(b"[1]").unwrap_err();
    assert!(err.to_string().contains("JSON object"), "{err}");
    let err = common(r#"{"max_tokens":0}"#).unwrap_err();
    assert!(err.to_string().contains("max_tokens"), "{err}");
    for n in ["0", "17", "-1"] {
        let err = common(&format!(r#"{{"n":{n}}}"#)).unwrap_err();
        assert!(err.to_string().contains("`n`"), "{err}");
    }
    assert_eq!(common(r#"{"n":4}"#).unwrap().n, 4);
    let echo = Scoring {
        logprobs: Some(1),
        echo: true,
    };
    let zero = parse::<CommonParams>(br#"{"max_tokens":0}"#).unwrap();
    assert_eq!(
        zero.validate("m", &default_limits(), echo)
            .unwrap()
            .max_tokens,
        Some(0),
        "echo may ask for no completion"
    );
    for (body, param) in [
        (r#"{"prompt":"a","logprobs":6}"#, "logprobs"),
        (r#"{"prompt":"a","logprobs":-1}"#, "logprobs"),
    ] {
        let err = parse::<CompletionRequest>(body.as_bytes())
            .unwrap()
            .scoring()
            .unwrap_err();
        assert!(err.to_string().contains(param), "{body}: {err}");
    }
    for (body, param) in [
        (
            r#"{"messages":[],"logprobs":true,"top_logprobs":21}"#,
            "top_logprobs",
        ),
        (r#"{"messages":[],"top_logprobs":2}"#, "top_logprobs"),
    ] {
        let err = parse::<ChatRequest>(body.as_bytes())
            .unwrap()
            .scoring()
            .unwrap_err();
        assert!(err.to_string().contains(param), "{body}: {err}");
    }
    let chat = parse::<ChatRequest>(br#"{"messages":[],"logprobs":true,"top_logprobs":3}"#)
        .unwrap()
        .scoring()
        .unwrap();
    assert_eq!(chat.logprobs, Some(3));
    let err = common(r#"{"stop":["a","b","c","d","e"]}"#).unwrap_err();
    assert!(err.to_string().contains("stop"), "{err}");
    assert!(matches!(
        common(r#"{"model":"other"}"#),
        Err(ApiError::ModelNotFound(_))
    ));
}

#[test]
fn output_formats_are_read_from_every_field_and_one_at_most() {
    let v = common(r#"{"response_format":{"type":"json_object"}}"#).unwrap();
    assert_eq!(
        v.format,
        Some((OutputFormat::JsonObject, "response_format"))
    );
    let v = common(r#"{"response_format":{"type":"text"}}"#).unwrap();
    assert_eq!(v.format, None);
    let v = common(
        r#"{"response_format":{"type":"json_schema","json_schema":{"name":"n","schema":{"type":"object"},"strict":true}}}"#,
    )
    .unwrap();
    assert!(matches!(
        v.format,
        Some((OutputFormat::JsonSchema { ref name, ref schema, strict: true }, _))
            if name == "n" && schema == r#"{"type":"object"}"#
    ));
    let v = common(r#"{"guided_json":"{\"type\":\"integer\"}"}"#).unwrap();
    assert!(matches!(
        v.format,
        Some((OutputFormat::JsonSchema { .. }, "guided_json"))
    ));
    let v = common(r#"{"guided_regex":"[a-z]+"}"#).unwrap();
    assert_eq!(
        v.format,
        Some((OutputFormat::Regex("[a-z]+".into()), "guided_regex"))
    );
    let v = common(r#"{"guided_choice":["yes","no"]}"#).unwrap();
    assert!(matches!(v.format, Some((OutputFormat::Choice(ref c), _)) if c.len() == 2));

    for bad in [
        r#"{"response_format":{"type":"xml"}}"#,
        r#"{"response_format":{"type":"json_schema"}}"#,
        r#"{"response_format":{"type":"json_schema","json_schema":{"name":"n"}}}"#,
        r#"{"response_format":{"type":"json_schema","json_schema":{"schema":3}}}"#,
        r#"{"guided_json":"{not json"}"#,
        r#"{"guided_regex":""}"#,
        r#"{"guided_choice":[]}"#,
        r#"{"guided_choice":["a",""]}"#,
        r#"{"guided_regex":"a","guided_choice":["a"]}"#,
    ] {
        let err = common(bad).unwrap_err();
        assert_eq!(err.status(), 400, "{bad}: {err}");
    }
}

#[test]
fn sampling_extras_are_read_and_out_of_range_ones_refused_by_name() {
    let v = common(
        r#"{"logit_bias":{"42":-100,"7":5},"presence_penalty":0.5,"frequency_penalty":-1,
            "repetition_penalty":1.2,"top_k":40,"min_p":0.05,"ignore_eos":true,"min_tokens":3,
            "max_tokens":10}"#,
    )
    .unwrap();
    let s = &v.shaping;
    assert_eq!(s.logit_bias, vec![(42, -100.0), (7, 5.0)]);
    assert_eq!((s.presence_penalty, s.frequency_penalty), (0.5, -1.0));
    assert_eq!((s.top_k, s.min_tokens, s.ignore_eos), (40, 3, true));
    assert!(common("{}").unwrap().shaping.is_identity());
    assert!(common(r#"{"top_k":-1}"#).unwrap().shaping.is_identity());
    for (bad, param) in [
        (r#"{"logit_bias":{"x":1}}"#, "logit_bias"),
        (r#"{"logit_bias":{"1":101}}"#, "logit_bias"),
        (r#"{"presence_penalty":2.5}"#, "presence_penalty"),
        (r#"{"frequency_penalty":-3}"#, "frequency_penalty"),
        (r#"{"repetition_penalty":0}"#, "repetition_penalty"),
        (r#"{"top_k":-2}"#, "top_k"),
        (r#"{"min_p":1.5}"#, "min_p"),
        (r#"{"min_tokens":5,"max_tokens":4}"#, "min_tokens"),
        (r#"{"min_tokens":-1}"#, "min_tokens"),
    ] {
        let err = common(bad).unwrap_err();
        assert_eq!(err.status(), 400, "{bad}");
        assert_eq!(err.body().error.param.as_deref(), Some(param), "{bad}");
    }
}

#[test]
fn defaults_and_unknown_fields() {
    let v = common(r#"{"model":"m","frequency_penalty":0.5,"stop":"\n"}"#).unwrap();
    assert_eq!(v.max_tokens, None);
    assert_eq!(v.temperature, 1.0);
    assert_eq!(v.stops, vec!["\n".to_string()]);
}
