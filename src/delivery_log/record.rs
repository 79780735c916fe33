//! One delivery: its stored form (compact JSON, one ConfigMap data value) and its REST view.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

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

/// One delivery of one event to one endpoint, as kept in the endpoint's log.
///
/// The stored form is this struct as compact JSON with these (snake_case) field names; absent
/// optional fields are omitted. It is a persistent format: add fields only with `#[serde(default)]`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
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
    /// The envelope exactly as sent: `{"type", "timestamp", "data"}`.
    pub payload: Value,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<Timestamp>,
    /// When an attempt succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<Timestamp>,
    /// HTTP status of the last attempt that got a response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_status: Option<u16>,
    /// Why the last attempt failed (at most [`MAX_ERROR_CHARS`] characters once stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A new delivery id: `msg_` + a lowercase ULID of `now`. Valid as a ConfigMap key and sortable
/// by creation time.
pub fn new_delivery_id(now: Timestamp) -> String {
    format!("msg_{}", crate::ids::time_sortable_id(now))
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
    /// Whether the delivery succeeded or failed for good.
    pub fn is_finished(&self) -> bool {
        self.state.is_finished()
    }

    /// The contract's Delivery object: exactly its keys, `null` where a value is absent,
    /// timestamps RFC 3339 UTC in whole seconds with `Z`.
    pub fn to_api(&self) -> Value {
        let time = |t: Option<Timestamp>| t.map(crate::resources::rfc3339);
        json!({
            "attempts": self.attempts,
            "created_at": crate::resources::rfc3339(self.created_at),
            "delivered_at": time(self.delivered_at),
            "endpoint_id": self.endpoint_id,
            "event_type": self.event_type,
            "id": self.id,
            "last_error": self.last_error.as_deref().map(|e| truncate_error(e, MAX_ERROR_CHARS)),
            "max_attempts": self.max_attempts,
            "next_attempt_at": time(self.next_attempt_at),
            "organization_id": self.organization_id,
            "payload": self.payload,
            "response_status": self.response_status,
            "state": self.state.as_str(),
            "updated_at": crate::resources::rfc3339(self.updated_at),
        })
    }

    /// Caps `last_error` as storing it would; the in-memory image holds records in this form so
    /// that it equals what a recovery reads back.
    pub fn normalize(&mut self) {
        if let Some(error) = &self.last_error
            && error.chars().nth(MAX_ERROR_CHARS).is_some()
        {
            self.last_error = Some(truncate_error(error, MAX_ERROR_CHARS));
        }
    }

    /// The stored form: compact JSON, `last_error` capped at [`MAX_ERROR_CHARS`] characters.
    pub fn to_stored(&self) -> String {
        let too_long = self
            .last_error
            .as_ref()
            .is_some_and(|e| e.chars().nth(MAX_ERROR_CHARS).is_some());
        let result = if too_long {
            let mut capped = self.clone();
            capped.normalize();
            serde_json::to_string(&capped)
        } else {
            serde_json::to_string(self)
        };
        result.expect("a delivery record always serializes")
    }

    /// Parses the stored form.
    pub fn from_stored(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
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
            payload: json!({"type": "database.created", "timestamp": "2023-11-14T22:13:20Z", "data": {"n": n}}),
            state,
            attempts: 0,
            max_attempts: 8,
            created_at: created,
            updated_at: created,
            next_attempt_at: Some(created),
            delivered_at: None,
            response_status: None,
            last_error: None,
        }
    }

    #[test]
    fn stored_form_round_trips_and_omits_absent_fields() {
        let mut r = record(7, DeliveryState::Pending);
        r.updated_at = Timestamp::from_nanosecond(1_700_000_000_123_456_789).unwrap();
        let text = r.to_stored();
        assert!(!text.contains("delivered_at") && !text.contains('\n'));
        assert!(text.contains(r#""state":"pending""#));
        assert_eq!(DeliveryRecord::from_stored(&text).unwrap(), r);

        r.state = DeliveryState::Succeeded;
        r.delivered_at = Some(ts(9));
        r.response_status = Some(204);
        r.last_error = Some("previous attempt: timeout".into());
        assert_eq!(DeliveryRecord::from_stored(&r.to_stored()).unwrap(), r);
        assert_eq!(r.stored_len(), r.id.len() + r.to_stored().len());
    }

    #[test]
    fn last_error_is_capped_on_a_char_boundary() {
        let mut r = record(1, DeliveryState::Failed);
        r.last_error = Some("é".repeat(600));
        let back = DeliveryRecord::from_stored(&r.to_stored()).unwrap();
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

    #[test]
    fn to_api_has_exactly_the_contract_keys() {
        let r = record(3, DeliveryState::Pending);
        let api = r.to_api();
        let keys: Vec<&str> = api.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "attempts",
                "created_at",
                "delivered_at",
                "endpoint_id",
                "event_type",
                "id",
                "last_error",
                "max_attempts",
                "next_attempt_at",
                "organization_id",
                "payload",
                "response_status",
                "state",
                "updated_at"
            ]
        );
        assert_eq!(api["delivered_at"], Value::Null);
        assert_eq!(api["response_status"], Value::Null);
        assert_eq!(api["last_error"], Value::Null);
        assert_eq!(api["state"], "pending");
        assert_eq!(api["created_at"], "2023-11-14T22:13:23Z");
        assert_eq!(api["payload"]["data"]["n"], 3);

        let mut done = r.clone();
        done.state = DeliveryState::Succeeded;
        done.delivered_at = Some(Timestamp::from_nanosecond(1_700_000_010_999_000_000).unwrap());
        done.response_status = Some(200);
        done.next_attempt_at = None;
        let api = done.to_api();
        assert_eq!(api["delivered_at"], "2023-11-14T22:13:30Z");
        assert_eq!(api["response_status"], 200);
        assert_eq!(api["next_attempt_at"], Value::Null);
        assert_eq!(api["state"], "succeeded");
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
}
