{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "capy-webhooks.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, prefixed to the chart name unless it already contains it. */}}
{{- define "capy-webhooks.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "capy-webhooks.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "capy-webhooks.labels" -}}
helm.sh/chart: {{ include "capy-webhooks.chart" . }}
{{ include "capy-webhooks.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: capydb
{{- end }}

{{/* Labels selecting the operator pod. */}}
{{- define "capy-webhooks.selectorLabels" -}}
app.kubernetes.io/name: {{ include "capy-webhooks.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "capy-webhooks.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "capy-webhooks.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the ingest token. */}}
{{- define "capy-webhooks.ingestTokenSecret" -}}
{{- default (printf "%s-ingest-token" (include "capy-webhooks.fullname" .)) .Values.ingestToken.existingSecret }}
{{- end }}

{{- define "capy-webhooks.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
RBAC rules: exactly what the operator does, shared by the Role and the ClusterRole.
Kubernetes RBAC cannot restrict get/list/watch by label: the operator can read every Secret and
ConfigMap where these rules apply, although it selects its own by label, except client
certificates (mutual TLS): the Secrets of type kubernetes.io/tls that endpoints name, which the
controller gets by name and the dispatcher watches by type.
*/}}
{{- define "capy-webhooks.homeRules" -}}
# In the home (release) namespace only: revoking API keys (the api-key CLI deletes their Secrets
# `capy-api-key-*`).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["delete"]
# The controller Lease `capy-webhooks-controller`: one replica reconciles at a time
# (kube-lease-manager creates it, renews it with server-side apply, releases it).
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "list", "watch", "create", "update", "patch"]
# The event-type catalog: WebhookEventTypes of the home namespace, read through a watch.
- apiGroups: ["webhooks.capydb.io"]
  resources: ["webhookeventtypes"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{- define "capy-webhooks.rules" -}}
# The source of truth: the controller and caches watch endpoints; the REST facade creates,
# JSON-patches (update, rotate), deletes them; the dispatcher's auto-disable patches spec.active.
- apiGroups: ["webhooks.capydb.io"]
  resources: ["webhookendpoints"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
# Status is written with server-side apply (controller and dispatcher summaries) and read back.
- apiGroups: ["webhooks.capydb.io"]
  resources: ["webhookendpoints/status"]
  verbs: ["get", "patch"]
# Owner references with blockOwnerDeletion on the Secrets and ConfigMaps the operator creates
# require update on the owner's finalizers subresource (OwnerReferencesPermissionEnforcement).
- apiGroups: ["webhooks.capydb.io"]
  resources: ["webhookendpoints/finalizers"]
  verbs: ["update"]
# Signing secrets `<endpoint>-signing`: written by the controller with server-side apply (patch;
# the API server also checks create when the apply creates the Secret), read by the dispatcher and
# the REST facade. Deleting Secrets is granted in the home namespace only
# ("capy-webhooks.homeRules"): the garbage collector, not the operator, deletes signing secrets.
# The same get and create make the operator's own key Secrets in the home namespace on first start
# (`capy-webhooks-log-key`, `capy-webhooks-portal-key`, and `capy-webhooks-replica-key`, which
# replicas sign forwarded work with).
# The same get, list and watch read the kubernetes.io/tls Secrets endpoints name in
# `spec.clientCertificate` (mutual TLS to receivers), in the endpoints' namespaces.
# Label-selected (client certificates by type), but see the note above.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The delivery log `<organization>-<hash>-journal-<n>`: listed on start (and the first format's
# `<endpoint>-deliveries-<n>`, migrated), created by group commit, deleted when superseded
# (patch only when a create's answer was lost).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# kube-runtime's event Recorder creates events.k8s.io/v1 Events and patches repeats into series.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
