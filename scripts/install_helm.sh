#!/usr/bin/env bash
# Builds the real `helm` CLI from the Go module proxy into ~/.cache/sieve/bin (no Docker, no package manager).
# Idempotent and cached: does nothing when the pinned version is already there. Compiling takes a few minutes
# on two cores; the Go build and module caches make a rebuild fast.
#   HELM_VERSION   the helm v3 release to build (default below)
#   SIEVE_BIN_DIR  where the binary goes (default ~/.cache/sieve/bin)
set -euo pipefail

HELM_VERSION=${HELM_VERSION:-v3.21.4}
BIN_DIR=${SIEVE_BIN_DIR:-"$HOME/.cache/sieve/bin"}
HELM="$BIN_DIR/helm"
STAMP="$BIN_DIR/.helm-$HELM_VERSION"

if [ -x "$HELM" ] && [ -f "$STAMP" ]; then
  echo "[helm] $HELM_VERSION already at $HELM"
  exit 0
fi

command -v go >/dev/null || { echo "[helm] needs the Go toolchain (go) on PATH" >&2; exit 1; }
mkdir -p "$BIN_DIR"
echo "[helm] building helm $HELM_VERSION with $(go version | cut -d' ' -f3) into $BIN_DIR (a few minutes)"
start=$(date +%s)
# The version is stamped into the binary the way helm's own Makefile does; `helm version` reports it.
GOBIN="$BIN_DIR" CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -trimpath" go install -v \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
  "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" 2>&1 |
  awk '{ n++; if (n % 50 == 0) { printf "[helm] compiled %d packages (last: %s)\n", n, $0; fflush() } }'
rm -f "$BIN_DIR"/.helm-v*
touch "$STAMP"
echo "[helm] $("$HELM" version --short) built in $(( $(date +%s) - start ))s: $HELM"
