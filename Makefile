# capy-webhooks developer entry points. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

CLUSTER_DIR ?= $(CURDIR)/.cluster
CARGO ?= cargo
# Extra arguments for `make run`, e.g. RUN_ARGS="--log-format json".
RUN_ARGS ?=
# Arguments for the benchmark harness, e.g. BENCH_ARGS=--quick.
BENCH_ARGS ?=
# Organization of the development API key `make run` prints.
DEV_ORG ?= org_demo

.PHONY: help
help: ## List targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

.PHONY: disk-check
disk-check: ## Warn when the disk looks too small for a clean build (README, "Disk")
	@hack/check-disk.sh

.PHONY: control-plane
control-plane: ## Build etcd, kube-apiserver, kube-controller-manager, kubectl, helm once (cached)
	@hack/build-control-plane.sh >/dev/null

.PHONY: cluster
cluster: control-plane ## Start a local control plane in the background (.cluster/kubeconfig); reuses a running one
	@if hack/cluster.sh status $(CLUSTER_DIR) >/dev/null 2>&1; then \
	  echo "local control plane already running: export KUBECONFIG=$(CLUSTER_DIR)/kubeconfig"; \
	else \
	  hack/cluster.sh down $(CLUSTER_DIR) >/dev/null 2>&1 || true; \
	  CAPY_CLUSTER_WORKLOADS=true hack/cluster.sh up $(CLUSTER_DIR); \
	fi

.PHONY: cluster-down
cluster-down: ## Stop the local control plane and remove its data
	@hack/cluster.sh down $(CLUSTER_DIR)

.PHONY: image
image: ## Build the operator's image (capy-webhooks:dev) into target/image/capy-webhooks.tar, no registry
	@if [ "$$(uname -s)" = Linux ]; then hack/image.sh all >/dev/null; fi

.PHONY: node
node: cluster image ## One-node cluster on the local control plane (containerd, kubelet, kube-proxy, kube-scheduler); reuses a running one
	@hack/node.sh up $(CLUSTER_DIR)/kubeconfig
	@hack/node.sh load target/image/capy-webhooks.tar
	@echo "node Ready: export KUBECONFIG=$(CLUSTER_DIR)/kubeconfig; kubectl get nodes -o wide"

.PHONY: node-down
node-down: ## Remove the node and leave the host as it was found
	@hack/node.sh down

.PHONY: deploy
deploy: node ## helm upgrade --install the chart on the node with the local image and development values
	@hack/deploy.sh $(CLUSTER_DIR)/kubeconfig

.PHONY: crds
crds: ## Regenerate crds/ (and the Helm chart's copy) from the Rust types
	$(CARGO) run --quiet -- crd --kind WebhookEndpoint > crds/webhookendpoints.webhooks.capydb.io.yaml
	$(CARGO) run --quiet -- crd --kind WebhookEventType > crds/webhookeventtypes.webhooks.capydb.io.yaml
	cp crds/webhookendpoints.webhooks.capydb.io.yaml charts/capy-webhooks/files/crd.yaml
	cp crds/webhookeventtypes.webhooks.capydb.io.yaml charts/capy-webhooks/files/crd-webhookeventtypes.yaml

.PHONY: build
build: ## Build the operator (debug)
	$(CARGO) build

.PHONY: run
run: build ## Run the operator against $$KUBECONFIG, or a local control plane when it is unset
	@set -euo pipefail; \
	if [ -z "$${KUBECONFIG:-}" ]; then $(MAKE) --no-print-directory cluster; export KUBECONFIG=$(CLUSTER_DIR)/kubeconfig; fi; \
	kubectl=$$(hack/cluster.sh bin-dir)/kubectl; \
	$$kubectl apply --server-side -f crds/ >/dev/null; \
	$$kubectl wait --for=condition=Established --timeout=30s crd/webhookendpoints.webhooks.capydb.io crd/webhookeventtypes.webhooks.capydb.io >/dev/null; \
	key=$$(target/debug/capy-webhooks api-key create --org $(DEV_ORG) --name make-run --namespace default 2>/dev/null); \
	mkdir -p $(CLUSTER_DIR); token_file=$(CLUSTER_DIR)/ingest-token; \
	[ -s $$token_file ] || python3 -c 'import secrets; print(secrets.token_hex(24))' > $$token_file; \
	echo "KUBECONFIG=$$KUBECONFIG"; \
	echo "kubectl=$$kubectl"; \
	echo "development API key for organization $(DEV_ORG): $$key"; \
	echo "REST API: http://127.0.0.1:8080/v1/organizations/$(DEV_ORG)/webhook-endpoints"; \
	echo "ingest:   http://127.0.0.1:8081/v1/organizations/$(DEV_ORG)/events  (token in $$token_file)"; \
	exec target/debug/capy-webhooks run --namespace default --allow-http --allow-private-targets \
	  --ingest-token-file $$token_file $(RUN_ARGS)

.PHONY: bench
bench: disk-check control-plane otel-collector ## Throughput, latency and footprint on a local control plane, and pods on a real node; writes BENCHMARKS.md (BENCH_ARGS=--quick for a short run)
	@if [ "$$(uname -s)" = Linux ]; then hack/image.sh all >/dev/null; fi
	CAPY_OTELCOL=$$(hack/otel-collector.sh) $(CARGO) bench --bench capy -- $(BENCH_ARGS)

.PHONY: fmt
fmt: ## Format the code
	$(CARGO) fmt --all

.PHONY: lint
lint: ## rustfmt check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

.PHONY: fuzz-tools
fuzz-tools: ## Install schemathesis (PyPI) for the OpenAPI fuzz test, once (cached)
	@hack/fuzz-tools.sh >/dev/null

.PHONY: otel-collector
otel-collector: ## Build an OpenTelemetry Collector (OTLP receiver, file exporter) for the traces test, once (cached)
	@hack/otel-collector.sh >/dev/null

.PHONY: promtool
promtool: ## Build promtool (Prometheus' rule checker) from the Go module proxy for the alert tests, once (cached)
	@hack/promtool.sh >/dev/null

.PHONY: verifier-tools
verifier-tools: ## Install PyNaCl (PyPI) that the tests verify ed25519 (v1a) signatures with, once (cached)
	@hack/verifier-tools.sh >/dev/null

.PHONY: egress-proxy
egress-proxy: ## Unpack tinyproxy (Debian) that the egress proxy tests deliver through, once (cached)
	@hack/egress-proxy.sh >/dev/null

.PHONY: browser-tools
browser-tools: ## Install headless Chromium and chromedriver (Debian) for the portal's browser test, once
	@hack/browser-tools.sh

.PHONY: test
test: disk-check control-plane fuzz-tools verifier-tools promtool egress-proxy browser-tools otel-collector ## Every test: unit tests, integration tests on a real control plane, pods on a real node
	$(CARGO) fmt --all -- --check
	@# The images first: cargo holds target/ while tests run, so tests cannot build them.
	@if [ "$$(uname -s)" = Linux ]; then hack/image.sh all >/dev/null; fi
	CAPY_SCHEMATHESIS=$$(hack/fuzz-tools.sh) CAPY_VERIFIER_PYTHON=$$(hack/verifier-tools.sh) CAPY_OTELCOL=$$(hack/otel-collector.sh) CAPY_PROMTOOL=$$(hack/promtool.sh) CAPY_TINYPROXY=$$(hack/egress-proxy.sh) $(CARGO) test --no-fail-fast --lib --bins --tests -- --test-threads=4
	@if why=$$(hack/node.sh check); then \
	  echo "pods tests: ran on a real node (tests/pods.rs)"; \
	else \
	  echo "pods tests: NOT RUN, a node cannot run here: $$why (tests/pods.rs reported them ignored)"; \
	fi
