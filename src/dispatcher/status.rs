//! The dispatcher's part of an endpoint's status, built as a pure function: health, the delivery
//! summary, the `Healthy` condition and the reason for an automatic disable.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::{Value, json};

use crate::resources::{DeliverySummary, Health, WebhookEndpointStatus};

/// Condition type the dispatcher owns.
pub const CONDITION_HEALTHY: &str = "Healthy";

/// What the dispatcher wants its status fields to say.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchSummary {
    /// Health from the documented rule.
    pub health: Health,
    /// Counters and times.
    pub deliveries: DeliverySummary,
    /// Set when the dispatcher disabled the endpoint.
    pub disabled_reason: Option<String>,
}

fn healthy_condition(health: Health) -> (&'static str, &'static str, &'static str) {
    match health {
        Health::Healthy => ("True", "DeliveriesSucceed", "recent deliveries succeed"),
        Health::Degraded => ("True", "SomeDeliveriesFail", "some recent deliveries fail"),
        Health::Failing => ("False", "DeliveriesFail", "recent deliveries fail"),
        Health::Disabled => ("False", "Disabled", "the endpoint is inactive"),
        Health::Unknown => ("Unknown", "NoDeliveries", "no delivery attempted yet"),
    }
}

/// The server-side-apply body of the dispatcher's status fields, or `None` when the stored
/// status already says the same (so nothing is written).
pub fn status_patch(current: Option<&WebhookEndpointStatus>, want: &DispatchSummary, now: Timestamp) -> Option<Value> {
    let (status, reason, message) = healthy_condition(want.health);
    let previous = current.and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION_HEALTHY));
    let unchanged = current.is_some_and(|s| {
        s.health == Some(want.health)
            && s.deliveries.as_ref() == Some(&want.deliveries)
            && s.disabled_reason == want.disabled_reason
    }) && previous.is_some_and(|c| c.status == status && c.reason == reason);
    if unchanged {
        return None;
    }
    let transition = previous
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    let condition = Condition {
        type_: CONDITION_HEALTHY.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: None,
        last_transition_time: transition,
    };
    Some(json!({
        "apiVersion": "webhooks.capydb.io/v1",
        "kind": "WebhookEndpoint",
        "status": {
            "health": want.health,
            "deliveries": want.deliveries,
            "disabledReason": want.disabled_reason,
            "conditions": [condition],
        }
    }))
}

/// The Event, if any, that a health transition deserves: `(warning, reason, note)`.
pub fn transition_event(from: Health, to: Health) -> Option<(bool, &'static str, String)> {
    if from == to {
        return None;
    }
    match to {
        Health::Failing => Some((
            true,
            "EndpointFailing",
            format!("health went from {} to failing", from.as_str()),
        )),
        Health::Degraded => Some((
            true,
            "EndpointDegraded",
            format!("health went from {} to degraded", from.as_str()),
        )),
        Health::Healthy if from != Health::Unknown => Some((
            false,
            "EndpointRecovered",
            format!("health went from {} to healthy", from.as_str()),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(health: Health) -> DispatchSummary {
        DispatchSummary {
            health,
            deliveries: DeliverySummary {
                succeeded: 1,
                ..Default::default()
            },
            disabled_reason: None,
        }
    }

    fn stored(patch: &Value) -> WebhookEndpointStatus {
        serde_json::from_value(patch["status"].clone()).unwrap()
    }

    #[test]
    fn an_unchanged_summary_writes_nothing() {
        let t0 = Timestamp::from_second(100).unwrap();
        let first = status_patch(None, &summary(Health::Healthy), t0).expect("first write");
        let current = stored(&first);
        assert_eq!(current.health, Some(Health::Healthy));
        assert!(
            status_patch(
                Some(&current),
                &summary(Health::Healthy),
                Timestamp::from_second(200).unwrap()
            )
            .is_none()
        );
    }

    #[test]
    fn changes_write_and_keep_transition_time_while_the_condition_holds() {
        let t0 = Timestamp::from_second(100).unwrap();
        let t1 = Timestamp::from_second(200).unwrap();
        let current = stored(&status_patch(None, &summary(Health::Healthy), t0).unwrap());
        let mut more = summary(Health::Degraded);
        more.deliveries.failed = 1;
        let patch = status_patch(Some(&current), &more, t1).expect("changed");
        let cond = &patch["status"]["conditions"][0];
        assert_eq!(cond["reason"], "SomeDeliveriesFail");
        // Healthy stays True from healthy to degraded: the transition time is kept.
        assert_eq!(cond["lastTransitionTime"], json!(Time(t0)));
        let failing = status_patch(Some(&stored(&patch)), &summary(Health::Failing), t1).unwrap();
        assert_eq!(failing["status"]["conditions"][0]["status"], "False");
        assert_eq!(
            failing["status"]["conditions"][0]["lastTransitionTime"],
            json!(Time(t1))
        );
    }

    #[test]
    fn transitions_worth_an_event() {
        assert!(transition_event(Health::Healthy, Health::Healthy).is_none());
        assert_eq!(
            transition_event(Health::Healthy, Health::Failing).unwrap().1,
            "EndpointFailing"
        );
        assert!(transition_event(Health::Healthy, Health::Failing).unwrap().0);
        assert_eq!(
            transition_event(Health::Failing, Health::Healthy).unwrap().1,
            "EndpointRecovered"
        );
        assert!(transition_event(Health::Unknown, Health::Healthy).is_none());
    }
}
