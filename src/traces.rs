//! Traces: OpenTelemetry spans of REST requests, ingest, delivery-log writes and delivery
//! attempts, exported over OTLP/HTTP with protobuf when an endpoint is configured; off otherwise.
//!
//! Every exported span but the attempts' is a `tracing` span with the target [`TARGET`]. Only the
//! OpenTelemetry layer (installed by [`crate::telemetry::init`] when tracing is on) listens to
//! that target; the log filter turns it off. So with tracing off, a span costs what a disabled
//! `tracing` callsite costs (one cached interest check), and the helpers here return at once
//! ([`enabled`]). Attempt spans, one per delivery attempt and so most of the spans, are built with
//! the OpenTelemetry API directly ([`AttemptSpan`]): they need no `tracing` span (nothing logs
//! inside them), and skipping the layer's bookkeeping per span and per poll is most of what
//! tracing costs per delivery.
//!
//! The producer's trace: a W3C `traceparent` on the ingest request parents the request's span,
//! so the ingest span is in the producer's trace. The ingest span's context is kept with each
//! delivery in the durable log ([`encode`], 50 hex characters, only for sampled spans), and every
//! attempt of the delivery, however late and after any restart, is a child of it: one rule,
//! always parented, so that each attempt is in the producer's trace. Nothing of this is ever sent
//! to a receiver: attempts carry no tracing header.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, Tracer};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of every span exported as an OpenTelemetry span.
pub const TARGET: &str = "capy_otel";

/// The path appended to a base OTLP/HTTP endpoint (`--otlp-endpoint`,
/// `OTEL_EXPORTER_OTLP_ENDPOINT`), as the OTLP exporter specification says.
pub const TRACES_PATH: &str = "/v1/traces";

/// The W3C trace-context header.
pub const TRACEPARENT: &str = "traceparent";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// The tracer attempt spans are built with: the first [`Tracing::start`]'s (a process starts one).
static ATTEMPT_TRACER: OnceLock<Tracer> = OnceLock::new();

/// Whether spans are exported (an endpoint was configured and the exporter started).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Where spans go, by the specification's rules: `--otlp-endpoint` (a base URL, `/v1/traces`
/// appended), else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as it is), else
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (a base URL). `None`: tracing is off. Empty values count as unset.
pub fn traces_endpoint(flag: Option<&str>, traces_env: Option<&str>, base_env: Option<&str>) -> Option<String> {
    let set = |v: Option<&str>| v.map(str::trim).filter(|v| !v.is_empty()).map(str::to_string);
    if let Some(base) = set(flag) {
        return Some(with_traces_path(&base));
    }
    if let Some(signal) = set(traces_env) {
        return Some(signal);
    }
    set(base_env).map(|base| with_traces_path(&base))
}

/// `base` with [`TRACES_PATH`] appended (one slash between them).
fn with_traces_path(base: &str) -> String {
    format!("{}{TRACES_PATH}", base.trim_end_matches('/'))
}

/// `endpoint` fit for a log line: scheme, host, port and path; no credentials, no query.
pub fn shown(endpoint: &str) -> String {
    match url::Url::parse(endpoint) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.set_fragment(None);
            url.to_string()
        }
        Err(_) => "<not a URL>".to_string(),
    }
}

/// Checks a sampling ratio (`--trace-sampling-ratio`): a number from 0 to 1.
pub fn parse_sampling_ratio(text: &str) -> Result<f64, String> {
    let ratio: f64 = text.trim().parse().map_err(|_| format!("{text:?} is not a number"))?;
    if (0.0..=1.0).contains(&ratio) {
        Ok(ratio)
    } else {
        Err(format!("the sampling ratio must be from 0 to 1, not {ratio}"))
    }
}

/// The exporter and its spans' provider; [`Tracing::shutdown`] sends what is still queued.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Starts the exporter to `endpoint` (the full traces URL) with a parent-based sampler: a
    /// span with a parent follows the parent's decision, a root span is sampled at `ratio`.
    /// `OTEL_EXPORTER_OTLP_HEADERS` (and `..._TRACES_HEADERS`) add headers to every export; they
    /// are read by the exporter and never logged. Needs a Tokio runtime.
    pub fn start(endpoint: &str, ratio: f64) -> Result<(Self, Tracer), String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| format!("the OTLP exporter could not be built: {e}"))?;
        let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("capy-webhooks");
        }
        let resource = resource
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("capy-webhooks");
        let _ = ATTEMPT_TRACER.set(tracer.clone());
        ENABLED.store(true, Ordering::Relaxed);
        Ok((Self { provider }, tracer))
    }

    /// Exports the spans still queued and stops the exporter.
    pub fn shutdown(self) {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "the trace exporter did not shut down cleanly");
        }
    }
}

/// The compact stored form of a span context: trace id (32 hex), span id (16 hex) and flags
/// (2 hex), 50 characters.
pub fn encode(context: &SpanContext) -> String {
    format!(
        "{}{}{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8()
    )
}

/// Parses [`encode`]'s form (a remote span context); `None` for anything else, or an all-zero id.
pub fn decode(text: &str) -> Option<SpanContext> {
    if text.len() != 50 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let trace_id = TraceId::from_hex(&text[..32]).ok()?;
    let span_id = SpanId::from_hex(&text[32..48]).ok()?;
    let flags = u8::from_str_radix(&text[48..], 16).ok()?;
    let context = SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, TraceState::default());
    context.is_valid().then_some(context)
}

/// Parses a W3C `traceparent` header value (version `00`, or a later version's first four
/// fields, as the recommendation says); `None` when it is not one.
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let later_version = version != "00";
    if version.len() != 2
        || version.eq_ignore_ascii_case("ff")
        || (!later_version && parts.next().is_some())
        || trace.len() != 32
        || span.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    let lower_hex = |s: &str| s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !(lower_hex(version) && lower_hex(trace) && lower_hex(span) && lower_hex(flags)) {
        return None;
    }
    decode(&format!("{trace}{span}{flags}"))
}

/// Makes `span` a child of the remote span `parent` (when tracing is on).
pub fn set_parent(span: &tracing::Span, parent: &SpanContext) {
    if enabled() {
        let _ = span.set_parent(Context::new().with_remote_span_context(parent.clone()));
    }
}

/// Makes `span` a child of the span a `traceparent` header names, if it names one.
pub fn continue_from(span: &tracing::Span, traceparent: Option<&str>) {
    if enabled()
        && let Some(parent) = traceparent.and_then(parse_traceparent)
    {
        set_parent(span, &parent);
    }
}

/// The current span's context, when tracing is on and it is valid.
fn current_context() -> Option<SpanContext> {
    if !enabled() {
        return None;
    }
    let context = tracing::Span::current().context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

/// The stored form ([`encode`]) of the current span's context, when tracing is on and the span is
/// sampled: what a delivery keeps so that its attempts join the trace.
pub fn current_stored() -> Option<String> {
    current_context().filter(SpanContext::is_sampled).map(|c| encode(&c))
}

/// The `traceparent` of the current span, when tracing is on: what a replica relaying an event to
/// another sends with it.
pub fn current_traceparent() -> Option<String> {
    current_context().map(|c| format!("00-{}", encode_dashed(&c)))
}

/// The span of one delivery attempt (`webhook attempt`, kind client): a child of the context the
/// delivery kept ([`encode`]), so it is in the producer's trace however late; a root span (sampled
/// at the ratio) when it kept none. It names the receiver's host, never the URL's path or query
/// (they may carry credentials). Ends when [`AttemptSpan::end`] is called or it is dropped.
#[derive(Debug)]
pub struct AttemptSpan(Option<opentelemetry_sdk::trace::Span>);

/// What an attempt span names: the endpoint, the delivery, its event and which attempt it is.
#[derive(Debug, Clone, Copy)]
pub struct AttemptOf<'a> {
    /// The endpoint's id.
    pub endpoint: &'a str,
    /// The delivery's id.
    pub delivery: &'a str,
    /// The event's id.
    pub event: &'a str,
    /// 1 for the first attempt.
    pub attempt: u64,
    /// The receiver's URL (only its host is kept).
    pub url: &'a str,
    /// The delivery's stored trace context ([`encode`]), if it kept one.
    pub parent: Option<&'a str>,
}

impl AttemptSpan {
    /// Starts the span of an attempt; nothing (and no allocation) when tracing is off.
    pub fn start(of: AttemptOf<'_>) -> Self {
        if !enabled() {
            return Self(None);
        }
        let Some(tracer) = ATTEMPT_TRACER.get() else {
            return Self(None);
        };
        let mut attributes = Vec::with_capacity(8);
        attributes.push(KeyValue::new("capy.endpoint.id", of.endpoint.to_string()));
        attributes.push(KeyValue::new("capy.delivery.id", of.delivery.to_string()));
        attributes.push(KeyValue::new("capy.event.id", of.event.to_string()));
        attributes.push(KeyValue::new("capy.attempt", of.attempt as i64));
        if let Some(host) = url::Url::parse(of.url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
        {
            attributes.push(KeyValue::new("server.address", host));
        }
        let parent = match of.parent.and_then(decode) {
            Some(parent) => Context::new().with_remote_span_context(parent),
            None => Context::new(),
        };
        let span = tracer
            .span_builder("webhook attempt")
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(tracer, &parent);
        Self(Some(span))
    }

    /// Ends the span with how the attempt went: the receiver's status when it answered, and the
    /// outcome's class (`timeout`, `connect_error`, ...) when the attempt failed.
    pub fn end(mut self, status: Option<u16>, error_class: Option<&'static str>) {
        let Some(mut span) = self.0.take() else {
            return;
        };
        if let Some(status) = status {
            span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
        }
        if let Some(class) = error_class {
            span.set_attribute(KeyValue::new("error.type", class));
            span.set_status(Status::error(""));
        }
        span.end();
    }
}

/// `trace-span-flags`, as in a `traceparent` after its version.
fn encode_dashed(c: &SpanContext) -> String {
    format!("{}-{}-{:02x}", c.trace_id(), c.span_id(), c.trace_flags().to_u8())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_endpoint_gets_the_traces_path_and_a_signal_endpoint_is_used_as_is() {
        assert_eq!(traces_endpoint(None, None, None), None);
        assert_eq!(
            traces_endpoint(Some("http://collector:4318"), None, None).as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(
            traces_endpoint(Some("http://collector:4318/"), Some("http://other/x"), Some("http://b")).as_deref(),
            Some("http://collector:4318/v1/traces"),
            "the flag wins"
        );
        assert_eq!(
            traces_endpoint(None, Some("http://c:4318/custom"), Some("http://b:4318")).as_deref(),
            Some("http://c:4318/custom"),
            "the signal-specific variable is used as it is"
        );
        assert_eq!(
            traces_endpoint(Some(" "), Some(""), Some("http://b:4318/base/")).as_deref(),
            Some("http://b:4318/base/v1/traces")
        );
    }

    #[test]
    fn the_endpoint_is_shown_without_credentials_or_query() {
        assert_eq!(
            shown("https://user:pw@c.example:4318/v1/traces?k=s"),
            "https://c.example:4318/v1/traces"
        );
        assert_eq!(shown("not a url"), "<not a URL>");
    }

    #[test]
    fn sampling_ratios_are_from_zero_to_one() {
        assert_eq!(parse_sampling_ratio("0.25"), Ok(0.25));
        assert_eq!(parse_sampling_ratio("1"), Ok(1.0));
        assert_eq!(parse_sampling_ratio("0"), Ok(0.0));
        assert!(parse_sampling_ratio("1.5").is_err());
        assert!(parse_sampling_ratio("-0.1").is_err());
        assert!(parse_sampling_ratio("half").is_err());
        assert!(parse_sampling_ratio("NaN").is_err());
    }

    #[test]
    fn the_stored_form_round_trips_and_refuses_what_is_not_one() {
        let c = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let text = encode(&c);
        assert_eq!(text, "4bf92f3577b34da6a3ce929d0e0e473600f067aa0ba902b701");
        assert_eq!(decode(&text), Some(c));
        assert_eq!(decode(&text[1..]), None);
        assert_eq!(decode(&format!("{}{}01", "0".repeat(32), "1".repeat(16))), None);
        assert_eq!(decode(&"z".repeat(50)), None);
    }

    #[test]
    fn traceparent_headers_parse_as_the_recommendation_says() {
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = parse_traceparent(valid).expect("valid");
        assert_eq!(c.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(c.is_sampled() && c.is_remote());
        assert!(
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .is_some_and(|c| !c.is_sampled())
        );
        // A later version may carry more fields.
        assert!(parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra").is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
    }
}
