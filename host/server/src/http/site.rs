//! Who may call the public API from where: the `Host` a request names must be one this
//! server answers to (`--allowed-hosts`; by default, on loopback, its own names), and a
//! request carrying an `Origin` (a browser, on some page's behalf) must come from an
//! origin of `--cors-origins` (none by default). Without these, any web page a user
//! opens could drive a server on their machine: a `text/plain` POST needs no preflight,
//! and DNS rebinding lets the page read the answer. Clients that send no `Origin`
//! (curl, the OpenAI SDKs, agent frameworks) are not affected. Allowed origins get
//! proper CORS answers, preflights included.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// The host name of a `Host` or `Origin` value, lower-cased, without scheme or port
/// (an IPv6 address without its brackets).
pub fn host_name(value: &str) -> String {
    let authority = value
        .strip_prefix("http://")
        .or_else(|| value.strip_prefix("https://"))
        .unwrap_or(value);
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether a host name is the loopback interface's.
pub fn is_loopback_name(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The public API's site policy.
#[derive(Debug, Clone)]
pub struct SitePolicy {
    /// Host names answered; `None`: any.
    hosts: Option<Vec<String>>,
    /// Origins allowed, as `scheme://host[:port]`, lower-cased; `any`: every one.
    origins: Vec<String>,
    any_origin: bool,
}

impl SitePolicy {
    /// From the flags; with no `--allowed-hosts`, a loopback listener answers its own
    /// names and any other listener any name.
    pub fn new(listen: SocketAddr, allowed_hosts: &[String], cors_origins: &[String]) -> Self {
        let listed: Vec<String> = allowed_hosts
            .iter()
            .map(|h| h.trim())
            .filter(|h| !h.is_empty())
            .map(host_name)
            .collect();
        let hosts = if listed.iter().any(|h| h == "*") {
            None
        } else if !listed.is_empty() {
            Some(listed)
        } else if listen.ip().is_loopback() {
            Some(vec!["localhost".into(), "127.0.0.1".into(), "::1".into()])
        } else {
            None
        };
        let origins: Vec<String> = cors_origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
            .filter(|o| !o.is_empty())
            .collect();
        let any_origin = origins.iter().any(|o| o == "*");
        Self {
            hosts,
            origins,
            any_origin,
        }
    }

    fn host_allowed(&self, headers: &HeaderMap, uri_host: Option<&str>) -> Result<(), String> {
        let Some(hosts) = &self.hosts else {
            return Ok(());
        };
        // HTTP/2 carries the authority in the URI; HTTP/1 in `Host`.
        let given = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(host_name)
            .or_else(|| uri_host.map(host_name));
        match given {
            None => Ok(()),
            Some(h) if hosts.contains(&h) => Ok(()),
            Some(h) => Err(h),
        }
    }

    /// The allowed origin a request came from: `Ok(None)` without an `Origin`.
    fn origin(&self, headers: &HeaderMap) -> Result<Option<HeaderValue>, String> {
        let Some(value) = headers.get(header::ORIGIN) else {
            return Ok(None);
        };
        let text = value.to_str().unwrap_or("").trim_end_matches('/');
        let lower = text.to_ascii_lowercase();
        if self.any_origin || self.origins.contains(&lower) {
            Ok(Some(value.clone()))
        } else {
            Err(text.chars().take(200).collect())
        }
    }
}

/// Refuses cross-site use and answers CORS for the origins allowed.
pub async fn guard(State(policy): State<Arc<SitePolicy>>, req: Request, next: Next) -> Response {
    if let Err(host) = policy.host_allowed(req.headers(), req.uri().host()) {
        return ApiError::Forbidden(format!(
            "This server does not answer to the host name {host:?} (see --allowed-hosts)."
        ))
        .into_response();
    }
    let origin = match policy.origin(req.headers()) {
        Ok(origin) => origin,
        Err(origin) => {
            return ApiError::Forbidden(format!(
                "Requests from the web origin {origin:?} are not allowed (see --cors-origins)."
            ))
            .into_response()
        }
    };
    let Some(origin) = origin else {
        return next.run(req).await;
    };
    let mut response = if req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        let mut preflight = StatusCode::NO_CONTENT.into_response();
        let h = preflight.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, openai-organization, openai-project, x-stainless-lang, x-stainless-package-version, x-stainless-os, x-stainless-arch, x-stainless-runtime, x-stainless-runtime-version, x-stainless-retry-count, x-stainless-timeout"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        preflight
    } else {
        next.run(req).await
    };
    let h = response.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn loopback_listeners_answer_their_own_names_only() {
        let p = SitePolicy::new("127.0.0.1:8000".parse().unwrap(), &[], &[]);
        for ok in [
            "localhost:8000",
            "127.0.0.1:8000",
            "[::1]:8000",
            "LOCALHOST",
        ] {
            assert!(
                p.host_allowed(&headers(&[("host", ok)]), None).is_ok(),
                "{ok}"
            );
        }
        for bad in ["evil.example:8000", "127.0.0.1.nip.io", "attacker"] {
            assert!(
                p.host_allowed(&headers(&[("host", bad)]), None).is_err(),
                "{bad}"
            );
        }
        assert!(p
            .host_allowed(&HeaderMap::new(), Some("evil.example"))
            .is_err());
        let any = SitePolicy::new("0.0.0.0:8000".parse().unwrap(), &[], &[]);
        assert!(any
            .host_allowed(&headers(&[("host", "lynx.internal")]), None)
            .is_ok());
        let listed = SitePolicy::new(
            "0.0.0.0:8000".parse().unwrap(),
            &["api.example.com".into()],
            &[],
        );
        assert!(listed
            .host_allowed(&headers(&[("host", "api.example.com:443")]), None)
            .is_ok());
        assert!(listed
            .host_allowed(&headers(&[("host", "other.example.com")]), None)
            .is_err());
    }

    #[test]
    fn origins_are_refused_unless_listed() {
        let p = SitePolicy::new("127.0.0.1:8000".parse().unwrap(), &[], &[]);
        assert_eq!(p.origin(&HeaderMap::new()), Ok(None));
        assert!(p
            .origin(&headers(&[("origin", "https://evil.example")]))
            .is_err());
        assert!(p.origin(&headers(&[("origin", "null")])).is_err());
        let listed = SitePolicy::new(
            "127.0.0.1:8000".parse().unwrap(),
            &[],
            &["https://app.example.com/".into()],
        );
        assert!(listed
            .origin(&headers(&[("origin", "https://app.example.com")]))
            .is_ok_and(|o| o.is_some()));
        assert!(listed
            .origin(&headers(&[("origin", "http://app.example.com")]))
            .is_err());
    }
}
