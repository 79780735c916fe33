#!/usr/bin/env python3
"""Writes src/api/openapi.json, the OpenAPI 3.1 document of the public REST API.

Edit this script, then run `python3 hack/openapi.py`; a test checks real responses against it."""
import json, os

ts = {"type": "string", "format": "date-time", "description": "RFC 3339, UTC, with a Z"}
def err(desc):
    return {"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
def ok(desc, ref, code="200"):
    return {code: {"description": desc, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}}
common = {
    "400": err("Invalid input: bad JSON, an unknown field, a wrong type or an invalid value."),
    "401": err("Missing, malformed, unknown, revoked or expired credential."),
    "403": err("A valid credential of another organization (an organization or project-scoped API key, or a session)."),
    "413": err("Request body too large."),
    "415": err("Content-Type is not application/json."),
    "500": err("Internal error."),
    "503": {**err("The Kubernetes API cannot be reached, or the controller did not answer in time. See Retry-After."),
            "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait before retrying"}}},
}
def pick(*codes, extra=None):
    r = {c: common[c] for c in codes}
    r.update(extra or {})
    return r
not_found = {"404": err("No such endpoint in this organization (another organization's endpoints are not found either).")}
org = {"name": "orgID", "in": "path", "required": True, "schema": {"type": "string"}, "description": "Organization id"}
eid = {"name": "endpointID", "in": "path", "required": True, "schema": {"type": "string"}, "description": "Endpoint id"}
json_body = lambda ref: {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}

endpoint_props = {
    "created_at": ts, "description": {"type": "string", "maxLength": 1024},
    "event_types": {"type": "array", "items": {"type": "string"}, "description": "Exact event types or prefixes ending in .*; empty means all"},
    "id": {"type": "string"}, "is_active": {"type": "boolean"}, "organization_id": {"type": "string"},
    "updated_at": ts, "url": {"type": "string", "format": "uri", "maxLength": 2048},
}
endpoint_required = sorted(endpoint_props)
doc = {
    "openapi": "3.1.0",
    "info": {"title": "CapyDB webhooks API", "version": "1.0.0",
             "description": "Outbound webhook endpoints and delivery history. Errors use the body {\"error\": \"...\"}."},
    "servers": [{"url": "/"}],
    "security": [{"bearerAuth": []}],
    "paths": {
        "/v1/organizations/{orgID}/webhook-endpoints": {
            "parameters": [org],
            "get": {"operationId": "listWebhookEndpoints", "summary": "List endpoints with their health",
                    "responses": {**ok("The organization's endpoints, oldest first", "EndpointList"), **pick("401", "403", "500", "503")}},
            "post": {"operationId": "createWebhookEndpoint", "summary": "Create an endpoint; returns its signing secret once",
                     "requestBody": json_body("CreateEndpoint"),
                     "responses": {**ok("Created", "EndpointWithSecret", "201"), **pick("400", "401", "403", "413", "415", "500", "503")}},
        },
        "/v1/organizations/{orgID}/webhook-endpoints/{endpointID}": {
            "parameters": [org, eid],
            "patch": {"operationId": "updateWebhookEndpoint", "summary": "Change any subset of url, description, event_types, is_active",
                      "requestBody": json_body("UpdateEndpoint"),
                      "responses": {**ok("Updated", "EndpointResponse"), **pick("400", "401", "403", "413", "415", "500", "503", extra=not_found)}},
            "delete": {"operationId": "deleteWebhookEndpoint", "summary": "Delete an endpoint",
                       "responses": {**ok("Deleted", "Deleted"), **pick("401", "403", "500", "503", extra=not_found)}},
        },
        "/v1/organizations/{orgID}/webhook-endpoints/{endpointID}/rotate-secret": {
            "parameters": [org, eid],
            "post": {"operationId": "rotateWebhookEndpointSecret", "summary": "Rotate the signing secret; the previous one co-signs for a grace period",
                     "responses": {**ok("Rotated", "EndpointWithSecret"), **pick("401", "403", "500", "503", extra=not_found)}},
        },
        "/v1/organizations/{orgID}/webhook-endpoints/{endpointID}/deliveries": {
            "parameters": [org, eid, {"name": "limit", "in": "query", "required": False,
                                      "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}}],
            "get": {"operationId": "listWebhookDeliveries", "summary": "Newest deliveries first",
                    "responses": {**ok("Deliveries, newest first", "DeliveryList"), **pick("400", "401", "403", "500", "503", extra=not_found)}},
        },
        "/v1/organizations/{orgID}/webhook-endpoints/{endpointID}/deliveries/{deliveryID}/retry": {
            "parameters": [org, eid, {"name": "deliveryID", "in": "path", "required": True, "schema": {"type": "string"}}],
            "post": {"operationId": "retryWebhookDelivery",
                     "summary": "Send a finished delivery once more, now (beyond the published contract)",
                     "responses": {**ok("Queued; it is attempted now", "DeliveryResponse", "202"),
                                   **pick("401", "403", "500", "503", extra={**not_found, "409": err("The delivery is still pending.")})}},
        },
        "/v1/organizations/{orgID}/webhook-endpoints/{endpointID}/test": {
            "parameters": [org, eid],
            "post": {"operationId": "testWebhookEndpoint",
                     "summary": "Send a webhook.test event to this endpoint (beyond the published contract)",
                     "responses": {**ok("Queued; it is attempted now", "DeliveryResponse", "202"),
                                   **pick("401", "403", "500", "503", extra=not_found)}},
        },
    },
    "components": {
        "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                           "description": "An organization or project-scoped API key (capy_live_...; either acts on every route of its organization, and on no other) or a Clerk session token (RS256 JWT)"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "additionalProperties": False, "properties": {"error": {"type": "string"}}},
            "Endpoint": {"type": "object", "required": endpoint_required, "additionalProperties": False, "properties": endpoint_props},
            "EndpointWithHealth": {"type": "object", "required": endpoint_required + ["health"], "additionalProperties": False,
                                   "properties": {**endpoint_props, "health": {"type": "string", "enum": ["healthy", "degraded", "failing", "disabled", "unknown"]}}},
            "EndpointList": {"type": "object", "required": ["webhook_endpoints"], "additionalProperties": False,
                             "properties": {"webhook_endpoints": {"type": "array", "items": {"$ref": "#/components/schemas/EndpointWithHealth"}}}},
            "EndpointResponse": {"type": "object", "required": ["webhook_endpoint"], "additionalProperties": False,
                                 "properties": {"webhook_endpoint": {"$ref": "#/components/schemas/Endpoint"}}},
            "EndpointWithSecret": {"type": "object", "required": ["webhook_endpoint", "plaintext_secret"], "additionalProperties": False,
                                   "properties": {"webhook_endpoint": {"$ref": "#/components/schemas/Endpoint"},
                                                  "plaintext_secret": {"type": "string", "pattern": "^whsec_", "description": "Shown only by create and rotate-secret"}}},
            "Deleted": {"type": "object", "required": ["deleted"], "additionalProperties": False, "properties": {"deleted": {"const": True}}},
            "CreateEndpoint": {"type": "object", "required": ["url"], "additionalProperties": False,
                               "properties": {"url": endpoint_props["url"], "description": endpoint_props["description"],
                                              "event_types": endpoint_props["event_types"], "is_active": {"type": "boolean", "default": True}}},
            "UpdateEndpoint": {"type": "object", "additionalProperties": False,
                               "properties": {"url": endpoint_props["url"], "description": endpoint_props["description"],
                                              "event_types": endpoint_props["event_types"], "is_active": {"type": "boolean"}}},
            "Delivery": {"type": "object", "additionalProperties": False,
                         "required": ["attempts", "created_at", "delivered_at", "endpoint_id", "event_type", "id", "last_error",
                                      "max_attempts", "next_attempt_at", "organization_id", "payload", "response_status", "state", "updated_at"],
                         "properties": {"attempts": {"type": "integer", "minimum": 0}, "created_at": ts,
                                        "delivered_at": {"type": ["string", "null"], "format": "date-time"},
                                        "endpoint_id": {"type": "string"}, "event_type": {"type": "string"}, "id": {"type": "string"},
                                        "last_error": {"type": ["string", "null"]}, "max_attempts": {"type": "integer", "minimum": 1},
                                        "next_attempt_at": {"type": ["string", "null"], "format": "date-time"},
                                        "organization_id": {"type": "string"}, "payload": {},
                                        "response_status": {"type": ["integer", "null"]},
                                        "state": {"type": "string", "enum": ["pending", "succeeded", "failed"]}, "updated_at": ts}},
            "DeliveryResponse": {"type": "object", "required": ["delivery"], "additionalProperties": False,
                                 "properties": {"delivery": {"$ref": "#/components/schemas/Delivery"}}},
            "DeliveryList": {"type": "object", "required": ["deliveries"], "additionalProperties": False,
                             "properties": {"deliveries": {"type": "array", "items": {"$ref": "#/components/schemas/Delivery"}}}},
        },
    },
}
out = os.path.join(os.path.dirname(__file__), "..", "src", "api", "openapi.json")
with open(out, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
