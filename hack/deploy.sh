#!/usr/bin/env bash
# `make deploy`: the chart on the local node (hack/node.sh) with the image from `make image`.
#
#   hack/deploy.sh KUBECONFIG [helm args...]
#
# Runs `helm upgrade --install capy-webhooks charts/capy-webhooks` into namespace capy-webhooks
# with hack/deploy-values.yaml, waits until every pod is Ready, then prints how to reach the REST
# API and ingest from the host and how to mint an API key. The image's id goes into a pod
# annotation, so a rebuilt `capy-webhooks:dev` rolls the pods although its tag did not change.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
[ $# -ge 1 ] || { echo "usage: hack/deploy.sh KUBECONFIG [helm args...]" >&2; exit 2; }
export KUBECONFIG="$1"; shift
bin="$("$here/cluster.sh" bin-dir)"
ns=capy-webhooks
tar="$root/target/image/capy-webhooks.tar"
[ -f "$tar" ] || { echo "[deploy] no image at $tar: run make image" >&2; exit 1; }
image_id="$(tar -xOf "$tar" manifest.json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["Config"].split(".")[0][:12])')"
echo "[deploy] helm upgrade --install capy-webhooks (image capy-webhooks:dev, id $image_id)" >&2
"$bin/helm" upgrade --install capy-webhooks "$root/charts/capy-webhooks" \
  --namespace "$ns" --create-namespace -f "$here/deploy-values.yaml" \
  --set-string "podAnnotations.capydb\.io/image-id=$image_id" \
  --wait --timeout 5m "$@" >/dev/null
"$bin/kubectl" -n "$ns" rollout status deploy/capy-webhooks --timeout=5m >&2
"$bin/kubectl" -n "$ns" get pods -o wide >&2
cat <<MSG

capy-webhooks is running on the node, in namespace $ns.
  export KUBECONFIG=$KUBECONFIG
  kubectl=$bin/kubectl
REST API (in another shell):
  \$kubectl -n $ns port-forward svc/capy-webhooks 8080:8080
  curl -H "Authorization: Bearer \$KEY" http://127.0.0.1:8080/v1/organizations/org_demo/webhook-endpoints
Ingest:
  \$kubectl -n $ns port-forward svc/capy-webhooks-ingest 8081:8081
  TOKEN=\$(\$kubectl -n $ns get secret capy-webhooks-ingest-token -o jsonpath='{.data.token}' | base64 -d)
Mint an API key:
  KEY=\$(\$kubectl -n $ns exec deploy/capy-webhooks -- /capy-webhooks api-key create --org org_demo --namespace $ns)
Receivers on this machine: listen on $("$here/node.sh" host-ip) (pods reach the host there).
MSG
