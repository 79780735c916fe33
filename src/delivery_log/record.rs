//! One delivery: its stored form (compact JSON, one ConfigMap data value) and its REST view.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::delivery::outcome::NextStep;

/// Longest `last_error` kept, in characters (longer ones are cut and end in `…`).
pub const MAX_ERROR_CHARS: usize = 512;

/// Where a delivery stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Waiting for its first or next attempt.
    Pending,
    /// An attempt got a 2xx.
    Succeeded,
    /// Gave up after `max_attempts`, or could not be attempted.
    Failed,
}

impl DeliveryState {
    /// The lowercase name used by the REST API and the stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Succeeded => "succeeded",
            DeliveryState::Failed => "failed",
        }
    }

    /// Succeeded or failed: no further attempt is planned.
    pub fn is_finished(self) -> bool {
        !matches!(self, DeliveryState::Pending)
    }
}

/// One delivery of one event to one endpoint, as kept in the organization's log.
///
/// Its payload is not part of it: the log stores each event's payload once, beside the deliveries
/// that carry it ([`super::DeliveryLog`]). Its serde form is what replicas exchange when one
/// forwards a request to another (never stored: the log stores [`Stored`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    /// `msg_` + a time-sortable id ([`new_delivery_id`]); also the `webhook-id` header.
    pub id: String,
    /// The endpoint CR's name.
    pub endpoint_id: String,
    /// Organization owning the endpoint.
    pub organization_id: String,
    /// The event this delivery carries.
    pub event_id: String,
    /// The event's type.
    pub event_type: String,
    /// Where the delivery stands.
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempts: u32,
    /// Attempts allowed before the delivery is marked failed.
    pub max_attempts: u32,
    /// When the delivery was created (the event was accepted).
    pub created_at: Timestamp,
    /// When the record last changed.
    pub updated_at: Timestamp,
    /// When the next attempt is due (pending deliveries only).
    pub next_attempt_at: Option<Timestamp>,
    /// When an attempt succeeded.
    pub delivered_at: Option<Timestamp>,
    /// HTTP status of the last attempt that got a response.
    pub response_status: Option<u16>,
    /// Why the last attempt failed (at most [`MAX_ERROR_CHARS`] characters once stored).
    pub last_error: Option<String>,
    /// The trace context of the span that accepted the event (a sampled span only, in
    /// [`crate::traces::encode`]'s form): every attempt is a span of that trace. Never shown
    /// over REST, never sent to a receiver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// The stored form of a delivery (format 2): one ConfigMap data value, keyed by the delivery id,
/// in a segment of its organization's log. Short keys and millisecond times, because every byte
/// is written to etcd at every state change; the organization comes from the segment, the
/// payload from the event.
///
/// A persistent format: add fields only with `#[serde(default)]`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored<'a> {
    /// Endpoint name.
    e: std::borrow::Cow<'a, str>,
    /// Event id.
    v: std::borrow::Cow<'a, str>,
    /// Event type.
    t: std::borrow::Cow<'a, str>,
    /// State: `p`, `s` or `f`.
    s: char,
    /// Attempts made.
    a: u32,
    /// Attempts allowed.
    m: u32,
    /// Created, Unix milliseconds.
    c: i64,
    /// Updated, milliseconds after created (the other times too: short numbers).
    #[serde(default, skip_serializing_if = "is_zero")]
    u: i64,
    /// Next attempt, milliseconds after created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<i64>,
    /// Delivered, milliseconds after created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    d: Option<i64>,
    /// Response status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    r: Option<u16>,
    /// Last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x: Option<std::borrow::Cow<'a, str>>,
    /// Trace context of the accepting span (`traces::encode`), when traced; records written
    /// before traces have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    p: Option<std::borrow::Cow<'a, str>>,
}

/// A delivery as the first format stored it (`<endpoint>-deliveries-<seq>` segments, up to
/// version 0.1): every field spelled out, the payload in every record. Read to migrate.
#[derive(Deserialize)]
struct Legacy {
    id: String,
    endpoint_id: String,
    organization_id: String,
    event_id: String,
    event_type: String,
    payload: Value,
    state: DeliveryState,
    attempts: u32,
    max_attempts: u32,
    created_at: Timestamp,
    updated_at: Timestamp,
    #[serde(default)]
    next_attempt_at: Option<Timestamp>,
    #[serde(default)]
    delivered_at: Option<Timestamp>,
    #[serde(default)]
    response_status: Option<u16>,
    #[serde(default)]
    last_error: Option<String>,
}

fn millis(t: Timestamp) -> i64 {
    t.as_millisecond()
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn from_millis(ms: i64) -> Result<Timestamp, String> {
    Timestamp::from_millisecond(ms).map_err(|e| format!("time {ms} out of range: {e}"))
}

/// `t` to whole milliseconds, as the stored form keeps it.
fn to_millisecond(t: Timestamp) -> Timestamp {
    Timestamp::from_millisecond(t.as_millisecond()).unwrap_or(t)
}

/// A new delivery id: `msg_` + a lowercase ULID of `now`. Valid as a ConfigMap key and sortable
/// by creation time.
pub fn new_delivery_id(now: Timestamp) -> String {
    format!("msg_{}", crate::ids::time_sortable_id(now))
}

/// A new event id: [`super::EVENT_KEY_PREFIX`] (`evt_`) + a lowercase ULID of `now`. Valid as a
/// ConfigMap key and sortable by creation time.
pub fn new_event_id(now: Timestamp) -> String {
    format!("{}{}", super::EVENT_KEY_PREFIX, crate::ids::time_sortable_id(now))
}

/// Whether `key` can be a ConfigMap data key (`[-._a-zA-Z0-9]+`, at most 253 characters).
pub fn is_valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key != "."
        && key != ".."
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `error` cut to at most `max_chars` characters on a character boundary, ending in `…` when cut.
pub fn truncate_error(error: &str, max_chars: usize) -> String {
    match error.char_indices().nth(max_chars) {
        None => error.to_string(),
        Some(_) if max_chars == 0 => String::new(),
        Some(_) => {
            let keep = error.char_indices().nth(max_chars - 1).map_or(error.len(), |(i, _)| i);
            format!("{}…", &error[..keep])
        }
    }
}

/// Order of the REST listing: newest `created_at` first, then the larger id first.
pub(crate) fn newest_first(a: &DeliveryRecord, b: &DeliveryRecord) -> std::cmp::Ordering {
    b.created_at.cmp(&a.created_at).then_with(|| b.id.cmp(&a.id))
}

impl DeliveryRecord {
    /// A new delivery of event `event_id` to `endpoint_id`, pending and due at `now`.
    pub fn pending(
        id: String,
        endpoint_id: impl Into<String>,
        organization_id: impl Into<String>,
        (event_id, event_type): (&str, &str),
        max_attempts: u32,
        now: Timestamp,
    ) -> Self {
        Self {
            id,
            endpoint_id: endpoint_id.into(),
            organization_id: organization_id.into(),
            event_id: event_id.to_string(),
            event_type: event_type.to_string(),
            state: DeliveryState::Pending,
            attempts: 0,
            max_attempts,
            created_at: now,
            updated_at: now,
            next_attempt_at: Some(now),
            delivered_at: None,
            response_status: None,
            last_error: None,
            trace: None,
        }
    }

    /// Counts an attempt that ended at `at` (answered with `status`, if at all) and takes the
    /// step [`after_attempt`](crate::delivery::outcome::after_attempt) decided for it:
    /// succeeded (delivered now), due again, or failed.
    pub fn attempted(&mut self, status: Option<u16>, next: NextStep, last_error: Option<String>, at: Timestamp) {
        self.attempts += 1;
        self.updated_at = at;
        self.response_status = status;
        self.last_error = last_error;
        match next {
            NextStep::Succeeded => {
                self.state = DeliveryState::Succeeded;
                self.delivered_at = Some(at);
                self.next_attempt_at = None;
            }
            NextStep::RetryAt(next) => self.next_attempt_at = Some(next),
            NextStep::Failed => {
                self.state = DeliveryState::Failed;
                self.next_attempt_at = None;
            }
        }
    }

    /// Gives the delivery up at `at` without an attempt: failed, for `reason`.
    pub fn fail(&mut self, reason: &str, at: Timestamp) {
        self.state = DeliveryState::Failed;
        self.next_attempt_at = None;
        self.updated_at = at;
        self.last_error = Some(reason.to_string());
    }

    /// Makes a finished delivery pending again, due at `now`, with one more attempt allowed
    /// (a retry or a recovery asked for over the API).
    pub fn resend(&mut self, now: Timestamp) {
        self.state = DeliveryState::Pending;
        self.max_attempts = self.attempts + 1;
        self.next_attempt_at = Some(now);
        self.updated_at = now;
    }

    /// Whether the delivery succeeded or failed for good.
    pub fn is_finished(&self) -> bool {
        self.state.is_finished()
    }

    /// Brings the record to what storing it keeps: `last_error` capped, times in whole
    /// milliseconds. The in-memory log holds records in this form, so that it equals what a
    /// recovery reads back.
    pub fn normalize(&mut self) {
        if let Some(error) = &self.last_error
            && error.chars().nth(MAX_ERROR_CHARS).is_some()
        {
            self.last_error = Some(truncate_error(error, MAX_ERROR_CHARS));
        }
        self.created_at = to_millisecond(self.created_at);
        self.updated_at = to_millisecond(self.updated_at);
        self.next_attempt_at = self.next_attempt_at.map(to_millisecond);
        self.delivered_at = self.delivered_at.map(to_millisecond);
    }

    /// The stored form (format 2, see `Stored`): compact JSON, `last_error` capped at
    /// [`MAX_ERROR_CHARS`] characters.
    pub fn to_stored(&self) -> String {
        let last_error = self.last_error.as_deref().map(|e| {
            if e.chars().nth(MAX_ERROR_CHARS).is_some() {
                std::borrow::Cow::Owned(truncate_error(e, MAX_ERROR_CHARS))
            } else {
                std::borrow::Cow::Borrowed(e)
            }
        });
        let created = millis(self.created_at);
        let stored = Stored {
            e: self.endpoint_id.as_str().into(),
            v: self.event_id.as_str().into(),
            t: self.event_type.as_str().into(),
            s: match self.state {
                DeliveryState::Pending => 'p',
                DeliveryState::Succeeded => 's',
                DeliveryState::Failed => 'f',
            },
            a: self.attempts,
            m: self.max_attempts,
            c: created,
            u: millis(self.updated_at) - created,
            n: self.next_attempt_at.map(|t| millis(t) - created),
            d: self.delivered_at.map(|t| millis(t) - created),
            r: self.response_status,
            x: last_error,
            p: self.trace.as_deref().map(std::borrow::Cow::Borrowed),
        };
        serde_json::to_string(&stored).expect("a delivery record always serializes")
    }

    /// Parses the stored form of delivery `id` in a log of `organization_id`.
    pub fn from_stored(id: &str, organization_id: &str, text: &str) -> Result<Self, String> {
        let stored: Stored = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let state = match stored.s {
            'p' => DeliveryState::Pending,
            's' => DeliveryState::Succeeded,
            'f' => DeliveryState::Failed,
            other => return Err(format!("unknown state {other:?}")),
        };
        Ok(Self {
            id: id.to_string(),
            endpoint_id: stored.e.into_owned(),
            organization_id: organization_id.to_string(),
            event_id: stored.v.into_owned(),
            event_type: stored.t.into_owned(),
            state,
            attempts: stored.a,
            max_attempts: stored.m,
            created_at: from_millis(stored.c)?,
            updated_at: from_millis(stored.c.saturating_add(stored.u))?,
            next_attempt_at: stored.n.map(|n| from_millis(stored.c.saturating_add(n))).transpose()?,
            delivered_at: stored.d.map(|d| from_millis(stored.c.saturating_add(d))).transpose()?,
            response_status: stored.r,
            last_error: stored.x.map(std::borrow::Cow::into_owned),
            trace: stored.p.map(std::borrow::Cow::into_owned),
        })
    }

    /// Parses a record of the first stored format, which carried its own payload; returns the
    /// record (normalized) and the payload.
    pub fn from_legacy(text: &str) -> Result<(Self, Value), String> {
        let old: Legacy = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut record = Self {
            id: old.id,
            endpoint_id: old.endpoint_id,
            organization_id: old.organization_id,
            event_id: old.event_id,
            event_type: old.event_type,
            state: old.state,
            attempts: old.attempts,
            max_attempts: old.max_attempts,
            created_at: old.created_at,
            updated_at: old.updated_at,
            next_attempt_at: old.next_attempt_at,
            delivered_at: old.delivered_at,
            response_status: old.response_status,
            last_error: old.last_error,
            trace: None,
        };
        record.normalize();
        Ok((record, old.payload))
    }

    /// Bytes this record takes in a ConfigMap: its key plus its stored form.
    pub fn stored_len(&self) -> usize {
        self.id.len() + self.to_stored().len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    pub(crate) fn record(n: u32, state: DeliveryState) -> DeliveryRecord {
        let created = ts(i64::from(n));
        DeliveryRecord {
            id: format!("msg_{:026}", n),
            endpoint_id: "ep1".into(),
            organization_id: "org_1".into(),
            event_id: format!("evt_{n}"),
            event_type: "database.created".into(),
            state,
            attempts: 0,
            max_attempts: 8,
            created_at: created,
            updated_at: created,
            next_attempt_at: Some(created),
            delivered_at: None,
            response_status: None,
            last_error: None,
            trace: None,
        }
    }

    #[test]
    fn a_trace_context_is_stored_when_there_is_one_and_records_without_it_still_read() {
        let mut r = record(3, DeliveryState::Pending);
        // A record written before traces (or of an untraced event): no `p`, read back as none.
        let untraced = r.to_stored();
        assert!(!untraced.contains(r#""p":"#), "{untraced}");
        assert_eq!(
            DeliveryRecord::from_stored(&r.id, "org_1", &untraced).unwrap().trace,
            None
        );
        r.trace = Some("4bf92f3577b34da6a3ce929d0e0e473600f067aa0ba902b701".into());
        let traced = r.to_stored();
        assert!(
            traced.ends_with(r#","p":"4bf92f3577b34da6a3ce929d0e0e473600f067aa0ba902b701"}"#),
            "{traced}"
        );
        assert_eq!(DeliveryRecord::from_stored(&r.id, "org_1", &traced).unwrap(), r);
    }

    #[test]
    fn stored_form_round_trips_and_omits_absent_fields() {
        let mut r = record(7, DeliveryState::Pending);
        r.updated_at = Timestamp::from_nanosecond(1_700_000_000_123_456_789).unwrap();
        let text = r.to_stored();
        assert!(!text.contains(r#""d":"#) && !text.contains('\n'));
        assert!(text.contains(r#""s":"p""#));
        assert!(
            !text.contains("org_1"),
            "the organization comes from the segment: {text}"
        );
        // Times after the creation are stored as offsets: a new delivery's are all zero.
        let fresh = record(1, DeliveryState::Pending).to_stored();
        assert_eq!(
            fresh,
            r#"{"e":"ep1","v":"evt_1","t":"database.created","s":"p","a":0,"m":8,"c":1700000001000,"n":0}"#
        );
        // Times are kept to the millisecond.
        let back = DeliveryRecord::from_stored(&r.id, "org_1", &text).unwrap();
        assert_eq!(back.updated_at, Timestamp::from_millisecond(1_700_000_000_123).unwrap());
        r.normalize();
        assert_eq!(back, r);
        assert_eq!(r.to_stored(), text);

        r.state = DeliveryState::Succeeded;
        r.delivered_at = Some(ts(9));
        r.response_status = Some(204);
        r.last_error = Some("previous attempt: timeout".into());
        assert_eq!(DeliveryRecord::from_stored(&r.id, "org_1", &r.to_stored()).unwrap(), r);
        assert_eq!(r.stored_len(), r.id.len() + r.to_stored().len());
        assert!(DeliveryRecord::from_stored(&r.id, "org_1", "[]").is_err());
        let bad_state = r.to_stored().replace(r#""s":"s""#, r#""s":"q""#);
        assert!(
            DeliveryRecord::from_stored(&r.id, "org_1", &bad_state)
                .unwrap_err()
                .contains("unknown state")
        );
    }

    #[test]
    fn last_error_is_capped_on_a_char_boundary() {
        let mut r = record(1, DeliveryState::Failed);
        r.last_error = Some("é".repeat(600));
        let back = DeliveryRecord::from_stored(&r.id, "org_1", &r.to_stored()).unwrap();
        let stored = back.last_error.unwrap();
        assert_eq!(stored.chars().count(), MAX_ERROR_CHARS);
        assert!(stored.ends_with("é…"));
        r.normalize();
        assert_eq!(r.last_error.as_deref(), Some(stored.as_str()));

        assert_eq!(truncate_error("short", MAX_ERROR_CHARS), "short");
        let exact = "x".repeat(MAX_ERROR_CHARS);
        assert_eq!(truncate_error(&exact, MAX_ERROR_CHARS), exact);
        assert_eq!(truncate_error("abc", 0), "");
    }

    /// A record exactly as version 0.1 stored it (`<endpoint>-deliveries-<seq>` segments).
    pub(crate) const LEGACY_RECORD: &str = r#"{"id":"msg_01kbkz8g2v3m4n5p6q7r8s9t0v","endpoint_id":"ep-01kbkz7x","organization_id":"org_demo","event_id":"evt_01kbkz8g2v3m4n5p6q7r8s9t0w","event_type":"database.created","payload":{"type":"database.created","timestamp":"2026-11-30T10:00:00Z","data":{"db":"main"}},"state":"pending","attempts":1,"max_attempts":8,"created_at":"2026-11-30T10:00:00.123456789Z","updated_at":"2026-11-30T10:00:05.5Z","next_attempt_at":"2026-11-30T10:05:05.5Z","response_status":503,"last_error":"HTTP 503"}"#;

    #[test]
    fn the_first_stored_format_is_read_with_its_payload() {
        let (record, payload) = DeliveryRecord::from_legacy(LEGACY_RECORD).unwrap();
        assert_eq!(record.id, "msg_01kbkz8g2v3m4n5p6q7r8s9t0v");
        assert_eq!(record.endpoint_id, "ep-01kbkz7x");
        assert_eq!(record.organization_id, "org_demo");
        assert_eq!(record.event_type, "database.created");
        assert_eq!(record.state, DeliveryState::Pending);
        assert_eq!((record.attempts, record.max_attempts), (1, 8));
        assert_eq!(record.created_at.to_string(), "2026-11-30T10:00:00.123Z");
        assert_eq!(record.next_attempt_at.unwrap().to_string(), "2026-11-30T10:05:05.5Z");
        assert_eq!(record.response_status, Some(503));
        assert_eq!(payload["data"]["db"], "main");
        // Read as format 2, the first format is an error (never a half-read record).
        assert!(DeliveryRecord::from_stored(&record.id, "org_demo", LEGACY_RECORD).is_err());
        assert!(DeliveryRecord::from_legacy(&record.to_stored()).is_err());
    }

    #[test]
    fn delivery_ids_are_prefixed_sortable_keys() {
        let a = new_delivery_id(ts(0));
        let b = new_delivery_id(ts(1));
        assert!(a.starts_with("msg_") && a.len() == 4 + crate::ids::ID_LENGTH);
        assert!(a < b);
        assert!(is_valid_key(&a));
        assert!(!is_valid_key("a/b") && !is_valid_key("") && !is_valid_key(".."));
    }

    #[test]
    fn an_attempt_moves_the_record_as_decided() {
        let at = ts(100);
        // next step => (state, next attempt at, delivered at)
        let table = [
            (NextStep::Succeeded, (DeliveryState::Succeeded, None, Some(at))),
            (
                NextStep::RetryAt(ts(160)),
                (DeliveryState::Pending, Some(ts(160)), None),
            ),
            (NextStep::Failed, (DeliveryState::Failed, None, None)),
        ];
        for (next, (state, next_attempt_at, delivered_at)) in table {
            let mut r = record(1, DeliveryState::Pending);
            r.attempts = 2;
            r.last_error = Some("before".into());
            let error = (next != NextStep::Succeeded).then(|| "HTTP 500".to_string());
            r.attempted(Some(500), next, error.clone(), at);
            assert_eq!(r.state, state, "{next:?}");
            assert_eq!(r.next_attempt_at, next_attempt_at, "{next:?}");
            assert_eq!(r.delivered_at, delivered_at, "{next:?}");
            assert_eq!((r.attempts, r.updated_at), (3, at), "{next:?}");
            assert_eq!((r.response_status, r.last_error), (Some(500), error), "{next:?}");
        }
    }

    #[test]
    fn failing_without_an_attempt_and_sending_again() {
        let mut r = record(1, DeliveryState::Pending);
        r.attempts = 3;
        r.fail("the event's payload was lost", ts(50));
        assert_eq!(
            (r.state, r.next_attempt_at, r.updated_at),
            (DeliveryState::Failed, None, ts(50))
        );
        assert_eq!(r.last_error.as_deref(), Some("the event's payload was lost"));
        assert_eq!(r.attempts, 3, "no attempt is spent");

        r.resend(ts(60));
        assert_eq!(r.state, DeliveryState::Pending);
        assert_eq!((r.attempts, r.max_attempts), (3, 4), "exactly one more attempt");
        assert_eq!((r.next_attempt_at, r.updated_at), (Some(ts(60)), ts(60)));
        assert_eq!(
            r.last_error.as_deref(),
            Some("the event's payload was lost"),
            "kept until the attempt"
        );
    }
}
