//! The customer portal: a static page, its script and its styles, compiled into the binary and
//! served at `/portal/` with a strict Content-Security-Policy. The page signs in with a portal
//! session token (see [`crate::auth::portal_token`]) read from the URL's fragment, which never reaches
//! a server, and then calls the documented REST routes with it.

use serde::Deserialize;
use warp::Reply;
use warp::http::{HeaderMap, HeaderValue, Response, StatusCode, header};

/// The page.
pub const INDEX_HTML: &str = include_str!("portal/index.html");
/// Its script.
pub const APP_JS: &str = include_str!("portal/app.js");
/// Its styles.
pub const APP_CSS: &str = include_str!("portal/app.css");

/// Only this origin's own files, no inline script or style, no framing, no form posts, no
/// plugins: the page needs nothing else.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; object-src 'none'; frame-ancestors 'none'; \
     base-uri 'none'; form-action 'none'";

/// Body of `POST /v1/organizations/{org}/portal-sessions`; an empty body means `{}`.
#[derive(Deserialize, Debug, Clone, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "CreatePortalSession")]
pub struct SessionRequest {
    /// A session that may only read.
    #[serde(default)]
    pub read_only: bool,
}

impl SessionRequest {
    /// Parses the body, empty meaning defaults.
    pub fn parse(body: &[u8]) -> Result<Self, crate::http::ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        crate::http::parse_json(body)
    }
}

/// Where portal links start: `--portal-url` when set; otherwise the scheme
/// (`X-Forwarded-Proto` when a proxy says `https`, else `http`) and `Host` of the request. A
/// `Host` that is not a plain host and port is ignored for `localhost`.
pub fn base_url(configured: Option<&str>, headers: &HeaderMap) -> String {
    if let Some(url) = configured {
        return url.trim_end_matches('/').to_string();
    }
    let scheme = match headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()) {
        Some(p) if p.eq_ignore_ascii_case("https") => "https",
        _ => "http",
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| {
            !h.is_empty() && h.len() <= 255 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("localhost");
    format!("{scheme}://{host}")
}

/// Parses `--portal-session-ttl`: a duration of at least one minute and at most
/// [`crate::auth::portal_token::MAX_TTL`].
pub fn parse_session_ttl(text: &str) -> Result<std::time::Duration, String> {
    let ttl = crate::duration::parse_flag_duration(text)?;
    let max = crate::auth::portal_token::MAX_TTL.unsigned_abs();
    if ttl < std::time::Duration::from_secs(60) || ttl > max {
        return Err(format!("{text:?}: a portal session lasts from 1m to 24h"));
    }
    Ok(ttl)
}

/// Parses `--portal-url`: an absolute http(s) URL without a path beyond `/`, query or fragment.
pub fn parse_portal_url(text: &str) -> Result<String, String> {
    let url = url::Url::parse(text).map_err(|e| format!("{text:?} is not an absolute URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("{text:?} must be an http:// or https:// URL with a host"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{text:?} must be the server's base URL, without a path, query or fragment"
        ));
    }
    Ok(text.trim_end_matches('/').to_string())
}

fn asset(body: &'static str, content_type: &'static str) -> warp::reply::Response {
    let mut response = Response::new(body.into());
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // Revalidated on every load, so an upgrade reaches open browsers at their next visit.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /portal/`: the page; `/portal` (the route's template without its slash) redirects there,
/// so that the page's relative links resolve under `/portal/`.
pub fn page(path: &str) -> warp::reply::Response {
    if path.ends_with('/') {
        return asset(INDEX_HTML, "text/html; charset=utf-8");
    }
    let mut response = StatusCode::PERMANENT_REDIRECT.into_response();
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/portal/"));
    response
}

/// `GET /portal/app.js`.
pub fn script() -> warp::reply::Response {
    asset(APP_JS, "text/javascript; charset=utf-8")
}

/// `GET /portal/app.css`.
pub fn styles() -> warp::reply::Response {
    asset(APP_CSS, "text/css; charset=utf-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_files() {
        assert!(INDEX_HTML.contains(r#"src="app.js""#) && INDEX_HTML.contains(r#"href="app.css""#));
        // What the policy would block anyway must not be there to begin with.
        for page in [INDEX_HTML, APP_JS, APP_CSS] {
            for banned in [
                "src=\"http",
                "href=\"http",
                "src=\"//",
                "href=\"//",
                "url(",
                "@import",
                "fetch(\"http",
                "style=\"",
                "onclick",
                "eval(",
                "localStorage",
                "sessionStorage",
                "document.cookie",
                "innerHTML",
            ] {
                assert!(!page.contains(banned), "{banned} in the portal");
            }
        }
        assert!(!INDEX_HTML.contains("<script>"), "inline script");
    }

    #[test]
    fn base_urls() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            base_url(Some("https://hooks.example.com/"), &headers),
            "https://hooks.example.com"
        );
        assert_eq!(base_url(None, &headers), "http://localhost");
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert_eq!(base_url(None, &headers), "http://127.0.0.1:8080");
        headers.insert("x-forwarded-proto", HeaderValue::from_static("HTTPS"));
        assert_eq!(base_url(None, &headers), "https://127.0.0.1:8080");
        headers.insert(header::HOST, HeaderValue::from_static("evil.example/#token="));
        assert_eq!(base_url(None, &headers), "https://localhost");
    }

    #[test]
    fn serves_the_page_its_files_and_a_redirect() {
        for (response, content_type) in [
            (page("/portal/"), "text/html; charset=utf-8"),
            (script(), "text/javascript; charset=utf-8"),
            (styles(), "text/css; charset=utf-8"),
        ] {
            assert_eq!(response.status(), 200, "{content_type}");
            assert_eq!(response.headers()["content-type"], content_type);
            assert_eq!(response.headers()["content-security-policy"], CONTENT_SECURITY_POLICY);
        }
        let redirect = page("/portal");
        assert_eq!(redirect.status().as_u16(), 308);
        assert_eq!(redirect.headers()["location"], "/portal/");
    }

    #[test]
    fn flags() {
        assert_eq!(parse_session_ttl("1h").unwrap().as_secs(), 3600);
        assert!(parse_session_ttl("30s").is_err());
        assert!(parse_session_ttl("25h").is_err());
        assert_eq!(
            parse_portal_url("https://hooks.example.com/").unwrap(),
            "https://hooks.example.com"
        );
        assert!(parse_portal_url("https://hooks.example.com/portal").is_err());
        assert!(parse_portal_url("ftp://hooks.example.com").is_err());
    }

    #[test]
    fn session_requests() {
        assert!(!SessionRequest::parse(b"").unwrap().read_only);
        assert!(!SessionRequest::parse(b"{}").unwrap().read_only);
        assert!(SessionRequest::parse(br#"{"read_only": true}"#).unwrap().read_only);
        assert!(SessionRequest::parse(br#"{"read_only": "yes"}"#).is_err());
        assert!(SessionRequest::parse(br#"{"admin": true}"#).is_err());
    }
}
