#!/usr/bin/env bash
# Installs the real Milvus standalone server (the PyPI `milvus` wheel: the milvus binary with embedded etcd and
# local storage) into its own venv under ~/.cache/sieve, away from the main environment's pins. Idempotent.
# Needed by the Milvus index backend (`sieve stack --index milvus`, SIEVE_INDEX_BACKEND=milvus) and its tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VERSION=$(.venv/bin/python -c "from services.common.config import StackSettings as S; print(S().milvus_version)")
CACHE=$(.venv/bin/python -c "from services.common.config import StackSettings as S; print(S().cache_dir)")
HOME_DIR="$CACHE/milvus-$VERSION"
stamp="$HOME_DIR/venv/.sieve-installed"
if [ -f "$stamp" ]; then
  echo "[milvus] server $VERSION present in $HOME_DIR"
  exit 0
fi
echo "[milvus] installing the Milvus $VERSION server wheel into $HOME_DIR/venv (pip reuses its cache)"
rm -rf "$HOME_DIR/venv"
"$PY" -m venv "$HOME_DIR/venv"
# Without setuptools<70 the wheel's launcher fails on `import pkg_resources` (../shared/notes/milvus.md).
"$HOME_DIR/venv/bin/pip" install -q "milvus==$VERSION" "setuptools<70"
touch "$stamp"
echo "[milvus] installed"
