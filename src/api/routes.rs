//! The REST port's one route table: every path template, method and operation it serves.
//!
//! The `route` label of HTTP metrics, the `Allow` header of a 405, the request dispatch
//! ([`super::routes`]) and the OpenAPI document ([`super::openapi`]) all come from [`ROUTES`]
//! and from what each [`Operation`] says of itself, so a route cannot be served and not
//! documented, or documented with methods it does not take.

use crate::http::{BodyRule, Route, RouteTable};

/// What a route does. Each is served by one handler of [`super::ApiState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `GET` the organization's endpoints, with their health.
    ListEndpoints,
    /// `POST` a new endpoint; answers with its signing secret.
    CreateEndpoint,
    /// `PATCH` an endpoint's url, description, event types or active flag.
    UpdateEndpoint,
    /// `DELETE` an endpoint.
    DeleteEndpoint,
    /// `POST` for a new signing secret.
    RotateSecret,
    /// `GET` an endpoint's deliveries, newest first.
    ListDeliveries,
    /// `GET` an endpoint's attempts of the last 24 hours, by hour (the portal's chart).
    EndpointStats,
    /// `POST` a finished delivery once more.
    RetryDelivery,
    /// `POST` a `webhook.test` event to one endpoint.
    TestEndpoint,
    /// `POST` the failed deliveries of a time window again.
    RecoverDeliveries,
    /// `GET` an endpoint's delivery settings.
    GetSettings,
    /// `PATCH` an endpoint's delivery settings.
    UpdateSettings,
    /// `DELETE` an event's payload from every delivery log of the organization.
    EraseEvent,
    /// `POST` for a portal session token.
    CreatePortalSession,
    /// `GET` the event-type catalog.
    ListEventTypes,
    /// `POST` a filter and an event: whether the filter matches it (nothing is sent).
    TestFilter,
    /// `GET` the OpenAPI document.
    OpenApiDocument,
    /// `GET` the portal page (`/portal` redirects to `/portal/`).
    PortalPage,
    /// `GET` the portal's script.
    PortalScript,
    /// `GET` the portal's styles.
    PortalStyles,
}

/// What a caller must be allowed to do on the organization of the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Only reads.
    Read,
    /// Changes something or sends deliveries.
    Write,
}

impl Operation {
    /// What the caller must be allowed; `None` for the public routes (the document, the portal's
    /// files), which need no credential.
    pub fn access(self) -> Option<Access> {
        use Operation::*;
        match self {
            ListEndpoints | ListDeliveries | EndpointStats | GetSettings | ListEventTypes | TestFilter => {
                Some(Access::Read)
            }
            CreateEndpoint | UpdateEndpoint | DeleteEndpoint | RotateSecret | RetryDelivery | TestEndpoint
            | RecoverDeliveries | UpdateSettings | CreatePortalSession | EraseEvent => Some(Access::Write),
            OpenApiDocument | PortalPage | PortalScript | PortalStyles => None,
        }
    }

    /// Whether the operation reads a JSON body (always after the caller was authorized).
    pub fn body(self) -> Option<BodyRule> {
        use Operation::*;
        match self {
            CreateEndpoint | UpdateEndpoint | RecoverDeliveries | UpdateSettings | TestFilter => {
                Some(BodyRule::Required)
            }
            CreatePortalSession => Some(BodyRule::Optional),
            ListEndpoints | DeleteEndpoint | RotateSecret | ListDeliveries | EndpointStats | RetryDelivery
            | TestEndpoint | GetSettings | EraseEvent | ListEventTypes | OpenApiDocument | PortalPage
            | PortalScript | PortalStyles => None,
        }
    }

    /// Whether the operation counts against the organization's rate on the routes that send or
    /// read deliveries (`--organization-rate-limit`): 429 beyond it.
    pub fn rate_limited(self) -> bool {
        use Operation::*;
        matches!(
            self,
            ListDeliveries | EndpointStats | RetryDelivery | TestEndpoint | RecoverDeliveries | TestFilter
        )
    }
}

/// Path parameter of the organization id.
pub const ORG: &str = "org";
/// Path parameter of the endpoint id.
pub const ENDPOINT: &str = "id";
/// Path parameter of the delivery id.
pub const DELIVERY: &str = "delivery";
/// Path parameter of the event id.
pub const EVENT: &str = "event";

const fn route(template: &'static str, method: &'static str, operation: Operation) -> Route<Operation> {
    Route {
        template,
        method,
        operation,
    }
}

/// Every route of the REST port. The templates are the `route` labels of metrics, kept as they
/// were when each was hand-written.
pub static ROUTES: RouteTable<Operation> = RouteTable::new(&[
    route(
        "/v1/organizations/:org/webhook-endpoints",
        "GET",
        Operation::ListEndpoints,
    ),
    route(
        "/v1/organizations/:org/webhook-endpoints",
        "POST",
        Operation::CreateEndpoint,
    ),
    route(
        "/v1/organizations/:org/webhook-endpoints/:id",
        "PATCH",
        Operation::UpdateEndpoint,
    ),
    route(
        "/v1/organizations/:org/webhook-endpoints/:id",
        "DELETE",
        Operation::DeleteEndpoint,
    ),
    route(
        "/v1/organizations/:org/webhook-endpoints/:id/rotate-secret",
        "POST",
        Operation::RotateSecret,
    ),
    route(
        "/v1/organizations/:org/webhook-endpoints/:id/deliveries",
        "GET",
        Operation::ListDeliveries,
    ),
    route(
        "/v1/organizations/:org/webhook-endpoints/:id/stats",
        "GET",
        Operation::EndpointStats,
    ),
    route(
        "/v1/organizations/:org/webhook-endpoints/:id/deliveries/:delivery/retry",
        "POST",
        Operation::RetryDelivery,
    ),
    route(
        "/v1/organizations/:org/webhook-endpoints/:id/test",
        "POST",
        Operation::TestEndpoint,
    ),
    route(
        "/v1/organizations/:org/webhook-endpoints/:id/recover",
        "POST",
        Operation::RecoverDeliveries,
    ),
    route(
        "/v1/organizations/:org/webhook-endpoints/:id/settings",
        "GET",
        Operation::GetSettings,
    ),
    route(
        "/v1/organizations/:org/webhook-endpoints/:id/settings",
        "PATCH",
        Operation::UpdateSettings,
    ),
    route(
        "/v1/organizations/:org/portal-sessions",
        "POST",
        Operation::CreatePortalSession,
    ),
    route("/v1/organizations/:org/events/:event", "DELETE", Operation::EraseEvent),
    route("/v1/organizations/:org/event-types", "GET", Operation::ListEventTypes),
    route("/v1/organizations/:org/filters/test", "POST", Operation::TestFilter),
    route("/openapi.json", "GET", Operation::OpenApiDocument),
    route("/portal/", "GET", Operation::PortalPage),
    route("/portal/app.js", "GET", Operation::PortalScript),
    route("/portal/app.css", "GET", Operation::PortalStyles),
]);

/// The route template of a REST path (the `route` label of HTTP metrics): ids become `:org`,
/// `:id` and `:delivery`; a path no route serves is `other`.
pub fn route_template(path: &str) -> &'static str {
    ROUTES.template_of(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::OTHER_ROUTE;

    /// A concrete path made from a template: each parameter replaced by a made-up id.
    fn concrete(template: &str) -> String {
        template
            .split('/')
            .map(|segment| match segment.strip_prefix(':') {
                Some(name) => format!("{name}_0123"),
                None => segment.to_string(),
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    #[test]
    fn every_template_round_trips_with_its_ids_hidden() {
        for route in ROUTES.routes() {
            let path = concrete(route.template);
            assert_eq!(route_template(&path), route.template, "{path}");
            let matched = ROUTES.resolve(route.method, &path).unwrap();
            assert_eq!(matched.route.template, route.template);
            for name in [ORG, ENDPOINT, DELIVERY] {
                let want = if route.template.contains(&format!(":{name}")) {
                    format!("{name}_0123")
                } else {
                    String::new()
                };
                assert_eq!(matched.param(name), want, "{path} :{name}");
            }
        }
    }

    #[test]
    fn every_route_is_one_operation_and_every_operation_one_route() {
        let mut seen = std::collections::HashSet::new();
        for route in ROUTES.routes() {
            assert!(seen.insert(route.operation), "{:?} twice", route.operation);
            assert!(route.template.starts_with('/'), "{} is not absolute", route.template);
            // The rules an operation states match its route: a body is never read on a GET.
            if route.method == "GET" {
                assert_eq!(route.operation.body(), None, "{:?}", route.operation);
            }
        }
    }

    #[test]
    fn route_templates_hide_ids() {
        let base = "/v1/organizations/:org/webhook-endpoints";
        for (path, want) in [
            ("/v1/organizations/org_1/webhook-endpoints", base.to_string()),
            ("/v1/organizations/org_1/webhook-endpoints/ep-01", format!("{base}/:id")),
            (
                "/v1/organizations/org_1/webhook-endpoints/ep-01/rotate-secret",
                format!("{base}/:id/rotate-secret"),
            ),
            (
                "/v1/organizations/org_1/webhook-endpoints/ep-01/deliveries",
                format!("{base}/:id/deliveries"),
            ),
            (
                "/v1/organizations/org_1/webhook-endpoints/ep-01/deliveries/msg_1/retry",
                format!("{base}/:id/deliveries/:delivery/retry"),
            ),
            (
                "/v1/organizations/org_1/webhook-endpoints/ep-01/test",
                format!("{base}/:id/test"),
            ),
            (
                "/v1/organizations/org_1/webhook-endpoints/ep-01/recover",
                format!("{base}/:id/recover"),
            ),
            (
                "/v1/organizations/org_1/webhook-endpoints/ep-01/settings",
                format!("{base}/:id/settings"),
            ),
            (
                "/v1/organizations/org_1/webhook-endpoints/ep-01/stats",
                format!("{base}/:id/stats"),
            ),
            ("/openapi.json", "/openapi.json".to_string()),
            ("/portal", "/portal/".to_string()),
            ("/portal/", "/portal/".to_string()),
            ("/portal/app.js", "/portal/app.js".to_string()),
            ("/portal/app.css", "/portal/app.css".to_string()),
            (
                "/v1/organizations/org_1/portal-sessions",
                "/v1/organizations/:org/portal-sessions".to_string(),
            ),
            (
                "/v1/organizations/org_1/events/evt_01abc",
                "/v1/organizations/:org/events/:event".to_string(),
            ),
            (
                "/v1/organizations/org_1/event-types",
                "/v1/organizations/:org/event-types".to_string(),
            ),
        ] {
            assert_eq!(route_template(path), want, "{path}");
        }
        for other in [
            "/",
            "",
            "/v1/organizations/org_1/webhook-endpoints/",
            "/v1/organizations//webhook-endpoints",
            "/v1/organizations/org_1/webhook-endpoints//settings",
            "/v1/organizations/org_1/webhook-endpoints/ep-01/nope",
            "/v1/organizations/org_1/events",
            "/openapi.json/x",
            "/secret-looking/ep-0123456789",
            "/portal/app.js.map",
            "/portal/x/y",
            "/portal//",
        ] {
            assert_eq!(route_template(other), OTHER_ROUTE, "{other}");
        }
    }

    #[test]
    fn a_known_path_with_another_method_is_405_with_allow_and_an_unknown_path_404() {
        let collection = "/v1/organizations/org_1/webhook-endpoints";
        let e = ROUTES.resolve("PUT", collection).unwrap_err();
        assert_eq!((e.status.as_u16(), e.allow.as_deref()), (405, Some("GET, POST")));
        let e = ROUTES.resolve("GET", &format!("{collection}/ep-1")).unwrap_err();
        assert_eq!(e.allow.as_deref(), Some("PATCH, DELETE"));
        let e = ROUTES.resolve("POST", "/portal").unwrap_err();
        assert_eq!(e.allow.as_deref(), Some("GET"));
        let e = ROUTES.resolve("GET", &format!("{collection}/ep-1/nope")).unwrap_err();
        assert_eq!((e.status.as_u16(), e.allow), (404, None));
        // The allowed methods are the table's, per template, whatever order the table has them in.
        for route in ROUTES.routes() {
            let allowed = ROUTES.allowed_methods(route.template);
            assert!(allowed.split(", ").any(|m| m == route.method), "{allowed}");
        }
        assert_eq!(ROUTES.allowed_methods(OTHER_ROUTE), "");
    }
}
