#!/usr/bin/env bash
# Builds the real `helm` CLI from the Go module proxy into ~/.cache/sieve/bin (no Docker, no package manager).
# Idempotent and cached: does nothing when the pinned version is already there. The first build compiles about
# 1,000 packages (3-4 minutes on two cores); Go's module and build caches make a rebuild take seconds.
#   HELM_VERSION   the helm v3 release to build (default below)
#   SIEVE_BIN_DIR  where the binary goes (default ~/.cache/sieve/bin)
set -euo pipefail

HELM_VERSION=${HELM_VERSION:-v3.21.4}
BIN_DIR=${SIEVE_BIN_DIR:-"$HOME/.cache/sieve/bin"}
HELM="$BIN_DIR/helm"
RECIPE=2 # bump when the build flags below change, so cached binaries are rebuilt
STAMP="$BIN_DIR/.helm-$HELM_VERSION-r$RECIPE"

if [ -x "$HELM" ] && [ -f "$STAMP" ]; then
  echo "[helm] $HELM_VERSION already at $HELM"
  exit 0
fi

command -v go >/dev/null || PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "[helm] needs the Go toolchain (go) on PATH or in /usr/local/go/bin" >&2; exit 1; }
mkdir -p "$BIN_DIR"
start=$(date +%s)
echo "[helm] fetching helm.sh/helm/v3@$HELM_VERSION from the Go module proxy"
# The flags helm's own Makefile sets: the version, and the Kubernetes version that `helm template` and
# `helm lint` assume (from the client-go it is built with; v0.36 -> 1.36), instead of the source's 1.20 default.
gomod=$(cd "$BIN_DIR" && go mod download -json "helm.sh/helm/v3@$HELM_VERSION" |
  sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
client_go=$(awk '$1 == "k8s.io/client-go" { print $2; exit }' "$gomod")
IFS=. read -r cg_major cg_minor _ <<<"${client_go#v}"
k8s_major=$((cg_major + 1))
k8s_minor=$cg_minor
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.metadata="
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  ldflags+=" -X $pkg.k8sVersionMajor=$k8s_major -X $pkg.k8sVersionMinor=$k8s_minor"
done
echo "[helm] building helm $HELM_VERSION (client-go $client_go: Kubernetes $k8s_major.$k8s_minor)" \
  "with $(go version | cut -d' ' -f3) into $BIN_DIR (a few minutes the first time)"
GOBIN="$BIN_DIR" CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -trimpath" go install -v -ldflags "$ldflags" \
  "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" 2>&1 |
  awk '{ n++; if (n % 100 == 0) { printf "[helm] compiled %d packages (last: %s)\n", n, $0; fflush() } }'
rm -f "$BIN_DIR"/.helm-v*
touch "$STAMP"
echo "[helm] $("$HELM" version --short) built in $(($(date +%s) - start))s: $HELM"
