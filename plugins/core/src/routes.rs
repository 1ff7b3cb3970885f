//! Route normalization for the `endpoint` metric label: the routes lynx serves map to
//! their patterns, path parameters to placeholders, and everything else to one value.

/// The label of every request no known route matches.
pub const UNMATCHED: &str = "unmatched";

/// The routes lynx serves, as patterns; `{id}` matches one path segment.
const ROUTES: &[&str] = &[
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/v1/models/{id}",
    "/tokenize",
    "/detokenize",
    "/health",
    "/metrics",
];

/// The label for a request's path. The method is not part of the label's value (the
/// `method` label carries it), so any method maps the same way.
pub fn normalize(path: &str) -> &'static str {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    ROUTES
        .iter()
        .find(|pattern| matches(pattern, &segments))
        .copied()
        .unwrap_or(UNMATCHED)
}

fn matches(pattern: &str, segments: &[&str]) -> bool {
    let parts: Vec<&str> = pattern.split('/').skip(1).collect();
    parts.len() == segments.len()
        && parts
            .iter()
            .zip(segments)
            .all(|(p, s)| if *p == "{id}" { !s.is_empty() } else { p == s })
}

/// Whether a path segment looks like an identifier (a number or a UUID): the kind of
/// segment a route parameter carries.
pub fn is_identifier(segment: &str) -> bool {
    let numeric = !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit());
    let uuid = segment.len() == 36
        && segment.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    numeric || uuid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_routes_parameters_and_everything_else() {
        assert_eq!(normalize("/v1/completions"), "/v1/completions");
        assert_eq!(normalize("/v1/models?x=1"), "/v1/models");
        assert_eq!(normalize("/tokenize"), "/tokenize");
        assert_eq!(normalize("/detokenize"), "/detokenize");
        assert_eq!(normalize("/v1/models/smollm2"), "/v1/models/{id}");
        assert_eq!(normalize("/v1/models/"), UNMATCHED);
        assert_eq!(normalize("/v1/completions/extra"), UNMATCHED);
        assert_eq!(normalize("/"), UNMATCHED);
        assert_eq!(normalize(""), UNMATCHED);
        assert_eq!(normalize("/etc/passwd"), UNMATCHED);
    }

    #[test]
    fn identifiers() {
        assert!(is_identifier("12345"));
        assert!(is_identifier("123e4567-e89b-12d3-a456-426614174000"));
        assert!(!is_identifier("models"));
        assert!(!is_identifier(""));
    }
}
