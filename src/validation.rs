//! Validation of endpoint settings shared by the REST facade and the controller.
//!
//! The CRD schema refuses most bad input already; these checks repeat them so the facade answers
//! with a precise message before any API call, and add what a schema cannot express.

use crate::resources::{
    EVENT_TYPE_PATTERN, MAX_DESCRIPTION_LENGTH, MAX_EVENT_TYPE_LENGTH, MAX_EVENT_TYPES, MAX_URL_LENGTH,
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

/// Checks a whole spec; the first problem found is returned.
pub fn validate_spec(spec: &WebhookEndpointSpec, policy: UrlPolicy) -> Result<(), String> {
    validate_url(&spec.url, policy)?;
    validate_description(&spec.description)?;
    validate_event_types(&spec.event_types)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: UrlPolicy = UrlPolicy { allow_http: false };
    const LAX: UrlPolicy = UrlPolicy { allow_http: true };

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
}
