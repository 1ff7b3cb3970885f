//! The chat API's tool fields: `tools`, `tool_choice`, `parallel_tool_calls` (and the
//! deprecated `functions` / `function_call`), and the tool turns of `messages`
//! (assistant `tool_calls`, `tool` results). They are checked as OpenAI checks them,
//! each error naming its parameter, and a request that needs tools served is refused
//! with `tools_unsupported` by a plugin that cannot serve them: tools are never
//! silently dropped. `tool_choice: "none"` needs no tool served, so it is answered as
//! plain chat.

use lynx_plugin_host::LoadedPlugin;
use serde_json::Value;

use super::error::ApiError;
use super::requests::WireMessage;

/// The most tools a request may give (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;
/// The longest function name (OpenAI's limit).
pub const MAX_NAME: usize = 64;

/// What the request asks of tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

/// The first parameter of `body` that needs a plugin serving tool calls, after every
/// tool field is checked; `None` when the request is plain chat.
pub fn needs_tools(body: &Value, messages: &[WireMessage]) -> Result<Option<String>, ApiError> {
    let (tools, param) = match (body.get("tools"), body.get("functions")) {
        (Some(t), _) if !t.is_null() => (tool_names(t, "tools", true)?, "tools"),
        (_, Some(f)) if !f.is_null() => (tool_names(f, "functions", false)?, "functions"),
        _ => (Vec::new(), "tools"),
    };
    let choice = match (body.get("tool_choice"), body.get("function_call")) {
        (Some(c), _) if !c.is_null() => choice(c, "tool_choice", &tools, param)?,
        (_, Some(c)) if !c.is_null() => choice(c, "function_call", &tools, param)?,
        _ if tools.is_empty() => Choice::None,
        _ => Choice::Auto,
    };
    optional(
        body,
        None,
        "parallel_tool_calls",
        Value::is_boolean,
        "a boolean",
    )?;
    if let Some(i) = messages.iter().position(is_tool_turn) {
        return Ok(Some(format!("messages[{i}]")));
    }
    Ok(match choice {
        Choice::None => None,
        _ if tools.is_empty() => None,
        _ => Some(param.to_string()),
    })
}

/// The refusal of a request that needs tools (`param`) by a plugin that cannot serve
/// them: every released plugin version (0.1.0 to 0.3.0) has no tool calls to say.
pub fn unsupported(plugin: &LoadedPlugin, param: &str) -> ApiError {
    ApiError::InvalidRequest {
        message: format!(
            "`{param}` needs a plugin that serves tool calls; the active plugin `{}` (lynx:plugin@{}) cannot, and lynx does not answer a tool request without its tools.",
            plugin.name, plugin.wit_version
        ),
        param: Some(param.to_string()),
        code: Some("tools_unsupported".into()),
    }
}

/// An assistant turn that called tools, or a tool's (or legacy function's) result.
fn is_tool_turn(m: &WireMessage) -> bool {
    let calls = m
        .tool_calls
        .as_ref()
        .is_some_and(|c| !c.is_null() && c.as_array().is_none_or(|a| !a.is_empty()));
    calls || m.role == "tool" || m.role == "function"
}

/// The names of `tools` (`[{type: "function", function: {...}}]`, or with
/// `wrapped: false` the deprecated `functions`: `[{name, ...}]`), every entry checked.
fn tool_names(tools: &Value, param: &str, wrapped: bool) -> Result<Vec<String>, ApiError> {
    let Some(list) = tools.as_array() else {
        return Err(ApiError::invalid(
            format!("`{param}` must be an array of tools."),
            Some(param),
        ));
    };
    if list.len() > MAX_TOOLS {
        return Err(ApiError::invalid(
            format!(
                "`{param}` may hold at most {MAX_TOOLS} tools (got {}).",
                list.len()
            ),
            Some(param),
        ));
    }
    let mut names: Vec<String> = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        let (function, at) = if wrapped {
            let at = format!("{param}[{i}]");
            if tool.get("type").and_then(Value::as_str) != Some("function") {
                return Err(ApiError::invalid(
                    format!("`{at}.type` must be \"function\"."),
                    Some(&format!("{at}.type")),
                ));
            }
            match tool.get("function") {
                Some(f) if f.is_object() => (f, format!("{at}.function")),
                _ => {
                    return Err(ApiError::invalid(
                        format!("`{at}.function` must be an object with a `name`."),
                        Some(&format!("{at}.function")),
                    ))
                }
            }
        } else {
            (tool, format!("{param}[{i}]"))
        };
        let name = function_name(function, &at)?;
        optional(
            function,
            Some(&at),
            "description",
            Value::is_string,
            "a string",
        )?;
        optional(
            function,
            Some(&at),
            "strict",
            Value::is_boolean,
            "a boolean",
        )?;
        if let Some(schema) = function.get("parameters") {
            object_schema(schema, &format!("{at}.parameters"))?;
        }
        if names.contains(&name) {
            return Err(ApiError::invalid(
                format!("`{at}.name`: the function name {name:?} is given twice."),
                Some(&format!("{at}.name")),
            ));
        }
        names.push(name);
    }
    Ok(names)
}

/// A 400 unless `field` of `value` is absent, null, or `ok` (it must be `what`),
/// naming `at.field` (`field` alone at the body's top level).
fn optional(
    value: &Value,
    at: Option<&str>,
    field: &str,
    ok: fn(&Value) -> bool,
    what: &str,
) -> Result<(), ApiError> {
    match value.get(field) {
        Some(v) if !(v.is_null() || ok(v)) => {
            let param = at.map_or_else(|| field.to_string(), |at| format!("{at}.{field}"));
            Err(ApiError::invalid(
                format!("`{param}` must be {what}."),
                Some(&param),
            ))
        }
        _ => Ok(()),
    }
}

/// A function's name: 1 to 64 letters, digits, `_` or `-`, as OpenAI requires.
fn function_name(function: &Value, at: &str) -> Result<String, ApiError> {
    let param = format!("{at}.name");
    let name = function.get("name").and_then(Value::as_str).unwrap_or("");
    let good = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if name.is_empty() || name.len() > MAX_NAME || !name.chars().all(good) {
        return Err(ApiError::invalid(
            format!("`{param}` must be 1 to {MAX_NAME} letters, digits, underscores or dashes."),
            Some(&param),
        ));
    }
    Ok(name.to_string())
}

/// A tool's parameters: a JSON schema for an object (the call's arguments are one).
fn object_schema(schema: &Value, param: &str) -> Result<(), ApiError> {
    let Some(fields) = schema.as_object() else {
        return Err(ApiError::invalid(
            format!("`{param}` must be a JSON schema object."),
            Some(param),
        ));
    };
    match fields.get("type") {
        None => Ok(()),
        Some(Value::String(t)) if t == "object" => Ok(()),
        Some(Value::Array(ts)) if ts.iter().any(|t| t == "object") => Ok(()),
        Some(other) => Err(ApiError::invalid(
            format!("`{param}` must describe an object (`\"type\": \"object\"`), not {other}."),
            Some(param),
        )),
    }
}

/// `tool_choice` (or `function_call`): `"none"`, `"auto"`, `"required"`, or one named
/// function among `tools` (given by `tools_param`).
fn choice(c: &Value, param: &str, tools: &[String], tools_param: &str) -> Result<Choice, ApiError> {
    let named = match c {
        Value::String(s) => match s.as_str() {
            "none" => return Ok(Choice::None),
            "auto" => return Ok(Choice::Auto),
            "required" if param == "tool_choice" => {
                if tools.is_empty() {
                    return Err(ApiError::invalid(
                        format!("`{param}` is \"required\" but `{tools_param}` is empty."),
                        Some(param),
                    ));
                }
                return Ok(Choice::Required);
            }
            other => {
                return Err(ApiError::invalid(
                    format!("`{param}` must be \"none\", \"auto\", \"required\" or a named function (got {other:?})."),
                    Some(param),
                ))
            }
        },
        // `{"type": "function", "function": {"name": ...}}`, or `function_call`'s
        // `{"name": ...}`.
        Value::Object(o) if param == "tool_choice" => {
            if o.get("type").and_then(Value::as_str) != Some("function") {
                return Err(ApiError::invalid(
                    format!("`{param}.type` must be \"function\"."),
                    Some(param),
                ));
            }
            o.get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
        }
        Value::Object(o) => o.get("name").and_then(Value::as_str),
        _ => None,
    };
    let Some(name) = named else {
        return Err(ApiError::invalid(
            format!("`{param}` must be \"none\", \"auto\", \"required\" or a named function."),
            Some(param),
        ));
    };
    if !tools.iter().any(|t| t == name) {
        return Err(ApiError::invalid(
            format!("`{param}` names the function {name:?}, which is not in `{tools_param}`."),
            Some(param),
        ));
    }
    Ok(Choice::Named(name.to_string()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}})
    }

    fn decide(body: Value) -> Result<Option<String>, (Option<String>, String)> {
        let messages: Vec<WireMessage> = body
            .get("messages")
            .map(|m| serde_json::from_value(m.clone()).expect("messages"))
            .unwrap_or_default();
        needs_tools(&body, &messages).map_err(|e| match e {
            ApiError::InvalidRequest { param, message, .. } => (param, message),
            other => panic!("not a 400: {other}"),
        })
    }

    #[test]
    fn tool_requests_need_a_tool_serving_plugin_unless_the_choice_is_none() {
        assert_eq!(decide(json!({})), Ok(None));
        for choice in [json!(null), json!("auto"), json!("required")] {
            let body = json!({"tools": [weather()], "tool_choice": choice});
            assert_eq!(decide(body), Ok(Some("tools".into())), "{choice}");
        }
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let body = json!({"tools": [weather()], "tool_choice": named});
        assert_eq!(decide(body), Ok(Some("tools".into())));
        let body = json!({"tools": [weather()], "tool_choice": "none"});
        assert_eq!(decide(body), Ok(None));
        // An empty list is no tools; "auto" and "none" without tools are plain chat.
        assert_eq!(
            decide(json!({"tools": [], "tool_choice": "auto"})),
            Ok(None)
        );
        assert_eq!(decide(json!({"tool_choice": "none"})), Ok(None));
        // The deprecated names.
        let body = json!({"functions": [{"name": "f", "parameters": {"type": "object"}}]});
        assert_eq!(decide(body), Ok(Some("functions".into())));
        let body = json!({"functions": [{"name": "f"}], "function_call": {"name": "f"}});
        assert_eq!(decide(body), Ok(Some("functions".into())));
        let body = json!({"functions": [{"name": "f"}], "function_call": "none"});
        assert_eq!(decide(body), Ok(None));
    }

    #[test]
    fn tool_turns_in_the_history_need_it_too() {
        let call = json!([{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]);
        let body = json!({"messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": null, "tool_calls": call},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        ]});
        assert_eq!(decide(body), Ok(Some("messages[1]".into())));
        let body = json!({"messages": [{"role": "user", "content": "Hi"},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]});
        assert_eq!(decide(body), Ok(Some("messages[1]".into())));
        // An empty `tool_calls` list is no call.
        let body = json!({"messages": [{"role": "assistant", "content": "Hi", "tool_calls": []}]});
        assert_eq!(decide(body), Ok(None));
    }

    #[test]
    fn bad_tool_fields_are_400s_naming_the_parameter() {
        let named = |n: &str| json!({"type": "function", "function": {"name": n}});
        let schema = |s: Value| {
            json!({"tools": [{"type": "function",
                "function": {"name": "f", "parameters": s}}]})
        };
        let cases = [
            (json!({"tools": "f"}), "tools"),
            (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
            (
                json!({"tools": [{"type": "function"}]}),
                "tools[0].function",
            ),
            (json!({"tools": [named("")]}), "tools[0].function.name"),
            (json!({"tools": [named("a b")]}), "tools[0].function.name"),
            (
                json!({"tools": [named(&"x".repeat(65))]}),
                "tools[0].function.name",
            ),
            (
                json!({"tools": [named("f"), named("f")]}),
                "tools[1].function.name",
            ),
            (
                schema(json!({"type": "string"})),
                "tools[0].function.parameters",
            ),
            (schema(json!("object")), "tools[0].function.parameters"),
            (schema(json!([1])), "tools[0].function.parameters"),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"tools": [], "tool_choice": "required"}),
                "tool_choice",
            ),
            (
                json!({"tools": [weather()], "tool_choice": "always"}),
                "tool_choice",
            ),
            (
                json!({"tools": [weather()], "tool_choice": named("other")}),
                "tool_choice",
            ),
            (json!({"tool_choice": named("get_weather")}), "tool_choice"),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "function"}}),
                "tool_choice",
            ),
            (
                json!({"tools": [weather()], "tool_choice": 3}),
                "tool_choice",
            ),
            (
                json!({"tools": [weather()], "parallel_tool_calls": "yes"}),
                "parallel_tool_calls",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "description": 3}}]}),
                "tools[0].function.description",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]}),
                "tools[0].function.strict",
            ),
            (
                json!({"functions": [{"name": "f"}], "function_call": {"name": "g"}}),
                "function_call",
            ),
        ];
        for (body, param) in cases {
            match decide(body.clone()) {
                Err((p, message)) => {
                    assert_eq!(p.as_deref(), Some(param), "{body}: {message}");
                }
                Ok(v) => panic!("{body} accepted: {v:?}"),
            }
        }
        let many: Vec<Value> = (0..=MAX_TOOLS).map(|i| named(&format!("f{i}"))).collect();
        assert_eq!(
            decide(json!({"tools": many})).map_err(|e| e.0),
            Err(Some("tools".into()))
        );
        let most: Vec<Value> = (0..MAX_TOOLS).map(|i| named(&format!("f{i}"))).collect();
        assert_eq!(decide(json!({"tools": most})), Ok(Some("tools".into())));
    }
}
