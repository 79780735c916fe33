#!/usr/bin/env bash
# Builds a minimal OpenTelemetry Collector (OTLP receiver + file exporter) from the Go module proxy
# at the release pinned in hack/versions.env, once, into a cache outside the repository, and prints
# the path of its executable on its last line of stdout. tests/traces.rs runs it (found through
# CAPY_OTELCOL, set by the Makefile, or at the same cache path).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache="${CAPY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/capy-webhooks}"
bin="$cache/tools/otelcol-$OTELCOL_VERSION"
exe="$bin/capy-otelcol"
if [[ -x "$exe" ]]; then echo "$exe"; exit 0; fi

command -v go >/dev/null || { echo "[otel-collector] go is not on PATH; install Go 1.24+ first" >&2; exit 1; }
export GOWORK=off CGO_ENABLED=0 GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
# Go's caches for this build (about 1 GiB) live under the work dir, so a failed build resumes from
# them, and are removed once the binary is built.
w="$cache/work/otelcol-$OTELCOL_VERSION"
go_tmp="$cache/work/otelcol-$OTELCOL_VERSION-go"
export GOCACHE="$go_tmp/build" GOMODCACHE="$go_tmp/mod" GOFLAGS="-buildvcs=false -modcacherw"
mkdir -p "$w" "$bin"
echo "[otel-collector] building the OpenTelemetry Collector v$OTELCOL_VERSION (OTLP receiver, file exporter); a few minutes, once" >&2
cat >"$w/go.mod" <<MOD
module capy.local/otelcol

go 1.24
MOD
cat >"$w/main.go" <<'GO'
// A collector with only what the traces test needs: OTLP over HTTP in, JSON lines in a file out.
package main

import (
	"log"

	"github.com/open-telemetry/opentelemetry-collector-contrib/exporter/fileexporter"
	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/confmap"
	"go.opentelemetry.io/collector/confmap/provider/fileprovider"
	"go.opentelemetry.io/collector/exporter"
	"go.opentelemetry.io/collector/otelcol"
	"go.opentelemetry.io/collector/receiver"
	"go.opentelemetry.io/collector/receiver/otlpreceiver"
	"go.opentelemetry.io/collector/service/telemetry/otelconftelemetry"
)

func components() (otelcol.Factories, error) {
	var err error
	f := otelcol.Factories{Telemetry: otelconftelemetry.NewFactory()}
	if f.Receivers, err = otelcol.MakeFactoryMap[receiver.Factory](otlpreceiver.NewFactory()); err != nil {
		return f, err
	}
	f.Exporters, err = otelcol.MakeFactoryMap[exporter.Factory](fileexporter.NewFactory())
	return f, err
}

func main() {
	settings := otelcol.CollectorSettings{
		BuildInfo: component.BuildInfo{Command: "capy-otelcol", Description: "capy-webhooks test collector", Version: "test"},
		Factories: components,
		ConfigProviderSettings: otelcol.ConfigProviderSettings{
			ResolverSettings: confmap.ResolverSettings{
				ProviderFactories: []confmap.ProviderFactory{fileprovider.NewFactory()},
				// The test's configuration has no ${...} references; one scheme must be named.
				DefaultScheme: "file",
			},
		},
	}
	if err := otelcol.NewCommand(settings).Execute(); err != nil {
		log.Fatal(err)
	}
}
GO
(cd "$w" \
  && go get "go.opentelemetry.io/collector/otelcol@v$OTELCOL_VERSION" \
            "go.opentelemetry.io/collector/receiver/otlpreceiver@v$OTELCOL_VERSION" \
            "github.com/open-telemetry/opentelemetry-collector-contrib/exporter/fileexporter@v$OTELCOL_VERSION" >&2 \
  && go mod tidy >&2 \
  && go build -trimpath -ldflags=-s -o "$exe.tmp" . >&2)
mv "$exe.tmp" "$exe"
rm -rf "$go_tmp"
echo "[otel-collector] built $exe" >&2
echo "$exe"
