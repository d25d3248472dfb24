"""A private model on the session's shared Triton, so promotion tests switch versions without touching others.

Promotion rewrites a model's version folders and reloads it; doing that to sieve_embedder would change what every
other test in the session is served. Each test gets ``sieve_embedder_t<namespace>`` instead: a copy of the STN
embedder (version 2 of sieve_embedder) as its version 1, loaded into the same Triton and removed afterwards.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import tritonclient.grpc as grpcclient

SOURCE = "sieve_embedder"
SOURCE_VERSION = "2"
BROKEN_MODEL_PY = """
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("this version is broken on purpose")
"""


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@contextmanager
def private_model(repo_root: Path, triton_url: str, namespace: str) -> Iterator[str]:
    """Creates, loads and finally unloads and deletes a model of this test's own in the shared repository."""
    name = f"{SOURCE}_t{namespace}"
    folder = repo_root / name
    config = (repo_root / SOURCE / "config.pbtxt").read_text()
    folder.mkdir()
    try:
        (folder / "config.pbtxt").write_text(re.sub(r'(?m)^name: ".*"$', f'name: "{name}"', config))
        shutil.copytree(repo_root / SOURCE / SOURCE_VERSION, folder / "1")
        client = grpcclient.InferenceServerClient(triton_url)
        try:
            client.load_model(name)
            wait_for(lambda: bool(client.is_model_ready(name, "1")), 180, f"{name} version 1 to load")
            yield name
        finally:
            try:
                client.unload_model(name)
                # Unloading finishes in the background; deleting the folder before it has left the model stuck
                # and the whole server not ready (is_server_ready False) for every later test.
                wait_for(lambda: _unloaded(client, name), 120, f"{name} to unload")
            finally:
                client.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _unloaded(client: grpcclient.InferenceServerClient, name: str) -> bool:
    states = [
        m.get("state")
        for m in client.get_model_repository_index(as_json=True).get("models", [])
        if m.get("name") == name
    ]
    return all(state == "UNAVAILABLE" for state in states)


def stage_candidate(workdir: Path, model: str, version: int, repo_root: Path, broken: bool = False) -> Path:
    """A candidate version folder where admins' promotions look for one (the trainer workdir's candidates/)."""
    target = workdir / "candidates" / model / str(version)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(repo_root / SOURCE / SOURCE_VERSION, target)
    if broken:  # backfills like a good one (model.pt is intact), then fails in Triton's initialize()
        (target / "model.py").write_text(BROKEN_MODEL_PY)
    return target


def serving_versions(triton_url: str, model: str) -> list[str]:
    client = grpcclient.InferenceServerClient(triton_url)
    try:
        return sorted(client.get_model_metadata(model).versions) if client.is_model_ready(model) else []
    finally:
        client.close()
