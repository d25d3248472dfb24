"""Fetch Debian packages as plain file trees, without root and without installing them.

``apt-get download`` only needs the apt lists that are already on the machine, and
``dpkg-deb --fsys-tarfile | tar -x`` unpacks anywhere, so building the photo set never touches the
system's package state. Every step is cached and marked complete only after it succeeded, so an
interrupted build resumes instead of trusting a half-written tree.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_DONE_MARKER = ".sieve-extracted.json"


class DebianFetchError(RuntimeError):
    """apt-get or dpkg-deb failed; the message carries their stderr."""


@dataclass(frozen=True)
class ExtractedPackage:
    """Where a package's files were unpacked, and which exact .deb they came from."""

    name: str
    version: str
    root: Path

    def path(self, relative: str) -> Path:
        """Path of a file inside the package, given as in the package (``usr/share/...``)."""
        return self.root / relative.lstrip("/")


def _run(cmd: Sequence[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise DebianFetchError(f"{cmd[0]} not found: this needs a Debian-based system") from exc
    if proc.returncode != 0:
        raise DebianFetchError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _cached_deb(package: str, deb_dir: Path) -> Path | None:
    # apt names files NAME_VERSION_ARCH.deb; pick the newest-modified one if several linger.
    found = sorted(deb_dir.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def download_deb(package: str, deb_dir: Path) -> Path:
    """Return the cached ``.deb`` for ``package``, downloading it with ``apt-get download`` once."""
    deb_dir.mkdir(parents=True, exist_ok=True)
    cached = _cached_deb(package, deb_dir)
    if cached is not None:
        return cached
    _run(["apt-get", "download", "-q", package], cwd=deb_dir)
    cached = _cached_deb(package, deb_dir)
    if cached is None:
        raise DebianFetchError(f"apt-get download {package} succeeded but left no .deb in {deb_dir}")
    return cached


def _deb_field(deb: Path, name: str) -> str:
    return _run(["dpkg-deb", "--field", str(deb), name]).strip()


def _extract(deb: Path, dest: Path, members: Sequence[str] | None) -> None:
    if members is None:
        _run(["dpkg-deb", "-x", str(deb), str(dest)])
        return
    # Stream the data tarball and keep only wanted members: no temp copy of the whole package.
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for info in tar:
            rel = info.name.removeprefix("./")
            if info.isfile() and any(fnmatch.fnmatchcase(rel, pat.lstrip("/")) for pat in members):
                tar.extract(info, dest, filter="data")
    if proc.wait() != 0:
        raise DebianFetchError(f"dpkg-deb --fsys-tarfile {deb} failed ({proc.returncode})")


def fetch_package(
    package: str,
    cache_dir: Path,
    *,
    members: Sequence[str] | None = None,
    keep_deb: bool = True,
) -> ExtractedPackage:
    """Download and unpack ``package`` under ``cache_dir``; a second call is a no-op.

    ``members`` are glob patterns on paths inside the package (``usr/share/x/*.png``); when given,
    only matching files are unpacked, which keeps large data packages cheap on disk. With
    ``keep_deb=False`` the ``.deb`` is deleted after a successful unpack (the tree is the cache).
    """
    deb_dir = cache_dir / "debs"
    members_key = hashlib.sha256(json.dumps(sorted(members or [])).encode()).hexdigest()[:10]
    tree_parent = cache_dir / "trees"
    for done in sorted(tree_parent.glob(f"{package}_*_{members_key}/{_DONE_MARKER}")):
        meta = json.loads(done.read_text())
        if meta.get("package") == package and meta.get("members") == sorted(members or []):
            return ExtractedPackage(package, str(meta["version"]), done.parent)

    deb = download_deb(package, deb_dir)
    version = _deb_field(deb, "Version")
    safe_version = version.replace(":", "%3a").replace("/", "_")
    dest = tree_parent / f"{package}_{safe_version}_{members_key}"
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _extract(deb, staging, members)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    marker = {"package": package, "version": version, "deb": deb.name, "members": sorted(members or [])}
    (staging / _DONE_MARKER).write_text(json.dumps(marker, indent=1))
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    if not keep_deb:
        deb.unlink(missing_ok=True)
    return ExtractedPackage(package, version, dest)
