//! Validation of endpoint settings shared by the REST facade and the controller.
//!
//! The CRD schema refuses most bad input already; these checks repeat them so the facade answers
//! with a precise message before any API call, and add what a schema cannot express.

use std::collections::{BTreeMap, BTreeSet};

use crate::resources::{
    EVENT_TYPE_PATTERN, FORBIDDEN_HEADERS, MAX_ATTEMPTS_LIMIT, MAX_CUSTOM_HEADERS, MAX_DESCRIPTION_LENGTH,
    MAX_EVENT_TYPE_LENGTH, MAX_EVENT_TYPES, MAX_HEADER_VALUE_LENGTH, MAX_RATE_LIMIT, MAX_URL_LENGTH,
    WebhookEndpointSpec,
};

/// Which URLs the operator accepts as delivery targets.
#[derive(Debug, Clone, Copy, Default)]
pub struct UrlPolicy {
    /// Accept `http://` as well as `https://`.
    pub allow_http: bool,
}

/// Checks a delivery URL: absolute, http(s) per policy, has a host, no credentials, bounded length.
pub fn validate_url(raw: &str, policy: UrlPolicy) -> Result<url::Url, String> {
    if raw.len() > MAX_URL_LENGTH {
        return Err(format!("url must be at most {MAX_URL_LENGTH} characters"));
    }
    let url = url::Url::parse(raw).map_err(|e| format!("url is not an absolute URL: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" if policy.allow_http => {}
        "http" => return Err("url must use https:// (plain http is not allowed by this operator)".into()),
        other => return Err(format!("url scheme {other:?} is not supported; use https://")),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("url must have a host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("url must not contain credentials".into());
    }
    Ok(url)
}

/// Checks one event-type pattern: `a.b.c` or `a.b.*`.
pub fn validate_event_type(pattern: &str) -> Result<(), String> {
    let valid_segment =
        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let body = pattern.strip_suffix(".*").unwrap_or(pattern);
    if pattern.is_empty() || pattern.len() > MAX_EVENT_TYPE_LENGTH || !body.split('.').all(valid_segment) {
        return Err(format!(
            "event type {pattern:?} is invalid: use dot-separated names of letters, digits, '_' and '-', \
             optionally ending in '.*' (pattern {EVENT_TYPE_PATTERN}), at most {MAX_EVENT_TYPE_LENGTH} characters"
        ));
    }
    Ok(())
}

/// Checks a list of event-type patterns.
pub fn validate_event_types(patterns: &[String]) -> Result<(), String> {
    if patterns.len() > MAX_EVENT_TYPES {
        return Err(format!("event_types may hold at most {MAX_EVENT_TYPES} entries"));
    }
    patterns.iter().try_for_each(|p| validate_event_type(p))
}

/// Checks a description's length.
pub fn validate_description(description: &str) -> Result<(), String> {
    if description.chars().count() > MAX_DESCRIPTION_LENGTH {
        return Err(format!(
            "description must be at most {MAX_DESCRIPTION_LENGTH} characters"
        ));
    }
    Ok(())
}

/// Whether `name` is an HTTP token (RFC 9110 section 5.6.2), the grammar of a header name.
fn is_http_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Checks custom delivery headers: at most [`MAX_CUSTOM_HEADERS`], names that are HTTP tokens,
/// none of [`FORBIDDEN_HEADERS`], no name twice in another case, values of printable ASCII of at
/// most [`MAX_HEADER_VALUE_LENGTH`] bytes. Messages name the header, never its value.
pub fn validate_headers(headers: &BTreeMap<String, String>) -> Result<(), String> {
    if headers.len() > MAX_CUSTOM_HEADERS {
        return Err(format!("headers may hold at most {MAX_CUSTOM_HEADERS} entries"));
    }
    let mut seen = BTreeSet::new();
    for (name, value) in headers {
        if !is_http_token(name) || name.len() > 256 {
            return Err(format!(
                "header name {:?} is not a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~, at most 256)",
                name.chars().take(64).collect::<String>()
            ));
        }
        let lower = name.to_ascii_lowercase();
        if FORBIDDEN_HEADERS.contains(&lower.as_str()) {
            return Err(format!(
                "header {name} cannot be set: the operator sets it (forbidden: {})",
                FORBIDDEN_HEADERS.join(", ")
            ));
        }
        if !seen.insert(lower) {
            return Err(format!("header {name} is given twice (header names ignore case)"));
        }
        if value.len() > MAX_HEADER_VALUE_LENGTH {
            return Err(format!(
                "the value of header {name} must be at most {MAX_HEADER_VALUE_LENGTH} bytes"
            ));
        }
        if !value.bytes().all(|b| b == b'\t' || (0x20..=0x7e).contains(&b)) {
            return Err(format!(
                "the value of header {name} must be printable ASCII (no line breaks)"
            ));
        }
    }
    Ok(())
}

/// Checks a rate limit in deliveries per second.
pub fn validate_rate_limit(rate: Option<u32>) -> Result<(), String> {
    match rate {
        Some(r) if !(1..=MAX_RATE_LIMIT).contains(&r) => Err(format!(
            "rate_limit must be from 1 to {MAX_RATE_LIMIT} deliveries per second, or null"
        )),
        _ => Ok(()),
    }
}

/// Checks a per-endpoint attempt limit.
pub fn validate_max_attempts(max_attempts: Option<u32>) -> Result<(), String> {
    match max_attempts {
        Some(n) if !(1..=MAX_ATTEMPTS_LIMIT).contains(&n) => {
            Err(format!("max_attempts must be from 1 to {MAX_ATTEMPTS_LIMIT}, or null"))
        }
        _ => Ok(()),
    }
}

/// Checks the name of a client certificate's Secret: a DNS-1123 subdomain, as Secret names are.
pub fn validate_secret_name(name: &str) -> Result<(), String> {
    let valid = (1..=253).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        Ok(())
    } else {
        Err(
            "client_certificate_secret must be a Secret name: lowercase letters, digits, '-' and '.', at most 253"
                .into(),
        )
    }
}

/// Checks an endpoint filter: CEL that compiles to a bool within the cost limit (see
/// [`crate::delivery::filter`]); the message has the line and column of the problem.
pub fn validate_filter(filter: &str) -> Result<(), String> {
    compile_filter(filter).map(drop)
}

/// [`validate_filter`], answering the compiled filter.
pub fn compile_filter(filter: &str) -> Result<crate::delivery::filter::Filter, String> {
    if filter.trim().is_empty() {
        return Err("filter must not be empty (omit it, or null in an update, for none)".into());
    }
    crate::delivery::filter::Filter::compile(filter).map_err(|e| e.to_string())
}

/// Checks a whole spec; the first problem found is returned.
pub fn validate_spec(spec: &WebhookEndpointSpec, policy: UrlPolicy) -> Result<(), String> {
    if let Some(certificate) = &spec.client_certificate {
        validate_secret_name(&certificate.secret_name)?;
    }
    validate_url(&spec.url, policy)?;
    validate_description(&spec.description)?;
    validate_event_types(&spec.event_types)?;
    validate_headers(&spec.headers)?;
    validate_rate_limit(spec.rate_limit)?;
    validate_max_attempts(spec.max_attempts)?;
    spec.filter.as_deref().map_or(Ok(()), validate_filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: UrlPolicy = UrlPolicy { allow_http: false };
    const LAX: UrlPolicy = UrlPolicy { allow_http: true };

    #[test]
    fn secret_names() {
        assert!(validate_secret_name("client-tls.v2").is_ok());
        for bad in ["", "Client", "-a", "a-", "a/b", &"a".repeat(254)] {
            assert!(validate_secret_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn urls() {
        assert!(validate_url("https://example.com/hooks", STRICT).is_ok());
        assert!(
            validate_url("http://example.com/hooks", STRICT)
                .unwrap_err()
                .contains("https")
        );
        assert!(validate_url("http://example.com/hooks", LAX).is_ok());
        assert!(validate_url("ftp://example.com", LAX).unwrap_err().contains("scheme"));
        assert!(validate_url("/relative", LAX).unwrap_err().contains("absolute"));
        assert!(
            validate_url("https://user:pw@example.com", LAX)
                .unwrap_err()
                .contains("credentials")
        );
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LENGTH));
        assert!(validate_url(&long, LAX).unwrap_err().contains("2048"));
    }

    #[test]
    fn event_types() {
        for ok in ["database.created", "database.*", "a", "a-b_c.d"] {
            assert!(validate_event_type(ok).is_ok(), "{ok}");
        }
        for bad in ["", "*", ".a", "a.", "a..b", "a.*.b", "a b", "a.**"] {
            assert!(validate_event_type(bad).is_err(), "{bad}");
        }
        assert!(validate_event_types(&vec!["a".to_string(); MAX_EVENT_TYPES + 1]).is_err());
    }

    #[test]
    fn headers() {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert!(validate_headers(&map(&[("X-Api-Key", "abc def"), ("x-tenant", "42\tb")])).is_ok());
        assert!(validate_headers(&map(&[])).is_ok());
        for forbidden in FORBIDDEN_HEADERS {
            let upper = forbidden.to_ascii_uppercase();
            let err = validate_headers(&map(&[(&upper, "v")])).unwrap_err();
            assert!(err.contains("cannot be set"), "{forbidden}: {err}");
        }
        for bad_name in ["", "X Api", "X:Api", "Ä", "x\n"] {
            assert!(
                validate_headers(&map(&[(bad_name, "v")]))
                    .unwrap_err()
                    .contains("not a valid"),
                "{bad_name:?}"
            );
        }
        let err = validate_headers(&map(&[("X-A", "1"), ("x-a", "2")])).unwrap_err();
        assert!(err.contains("twice"), "{err}");
        let err = validate_headers(&map(&[("X-A", "line\r\nInjected: yes")])).unwrap_err();
        assert!(err.contains("printable") && !err.contains("Injected"), "{err}");
        let long = "v".repeat(MAX_HEADER_VALUE_LENGTH + 1);
        assert!(validate_headers(&map(&[("X-A", &long)])).unwrap_err().contains("1024"));
        assert!(validate_headers(&map(&[("X-A", &long[1..])])).is_ok());
        let many: BTreeMap<String, String> = (0..=MAX_CUSTOM_HEADERS)
            .map(|i| (format!("x-{i}"), "v".into()))
            .collect();
        assert!(validate_headers(&many).unwrap_err().contains("16"));
    }

    #[test]
    fn rate_limits_and_attempts() {
        assert!(validate_rate_limit(None).is_ok());
        assert!(validate_rate_limit(Some(1)).is_ok());
        assert!(validate_rate_limit(Some(0)).is_err());
        assert!(validate_rate_limit(Some(MAX_RATE_LIMIT + 1)).is_err());
        assert!(validate_max_attempts(Some(50)).is_ok());
        assert!(validate_max_attempts(Some(0)).is_err());
        assert!(validate_max_attempts(Some(51)).is_err());
    }
}
