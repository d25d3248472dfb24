"""The main job runs without torch: serving and moderating must not import it (issue 28's guard).

Each entry point runs in a fresh interpreter that imports what its command imports, builds the objects that need
no server (the moderator's pipeline stages, the reviewer's app, the demo's samples), prepares an image through the
moderator's own decode-and-hash function and a worker process, and then reports whether ``torch`` was imported.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from services.common.config import REPO_ROOT

PROGRAMS = {
    "moderator": """
import io, numpy as np
from PIL import Image
from services.common.config import Settings
from services.common.prepared import PrepareSpec, prepare_image
from services.common.inference import TritonModels
from services.moderator.service import Moderator
from services.moderator.stages.workers import Workers
buf = io.BytesIO(); Image.fromarray((np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)).save(buf, "PNG")
spec = PrepareSpec.of(Settings())
prepare_image(buf.getvalue(), spec)
workers = Workers(1)
workers.call(prepare_image, buf.getvalue(), spec)
workers.close()
""",
    "reviewer": """
from services.common.config import Settings
from services.reviewer.app import build_services, create_app
from services.reviewer.settings import ReviewerSettings
rsettings = ReviewerSettings()
create_app(rsettings, build_services(Settings(), rsettings))  # clients only: nothing connects until used
""",
    "demo": """
import services.demo.run
import services.demo.samples
""",
}


@pytest.mark.parametrize("entry", sorted(PROGRAMS))
def test_entry_point_does_not_import_torch(entry: str) -> None:
    report = "import sys, json\nprint(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')))"
    program = PROGRAMS[entry] + "\n" + report + "\n"
    wrapped = "if __name__ == '__main__':\n" + "\n".join("    " + line for line in program.splitlines())
    done = subprocess.run(
        [sys.executable, "-c", wrapped], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [], f"{entry} imported torch"


WITHOUT_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
sys.meta_path.insert(0, NoTorch())
from services.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def _sieve_without_torch(*args: str) -> subprocess.CompletedProcess[str]:
    """``sieve ARGS`` in a fresh interpreter where importing torch fails, as in the serving install; Triton
    pointed at a port nothing listens on, so tools take their in-process path."""
    env = {**os.environ, "SIEVE_TRITON_URL": "127.0.0.1:9"}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_torch_command_without_torch_says_what_to_install() -> None:
    done = _sieve_without_torch("train", "--views-only")
    assert done.returncode == 3, done.stderr[-2000:]
    assert "sieve train needs torch" in done.stderr and "[train]" in done.stderr
    assert "Traceback" not in done.stderr


def test_sieve_explain_runs_without_torch_and_says_what_it_leaves_out(tmp_path: Path) -> None:
    """The scores, thresholds and keypoint matches come from the served artifacts; Grad-CAM and the warp need
    the network in torch, and the picture says so instead of failing."""
    import numpy as np

    from services.common.config import DecodeSettings
    from services.common.imaging import decode_image
    from services.evaluation.embed import latest_version, load_serving

    rng = np.random.default_rng(5)
    photo = Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).resize((480, 360))
    photo.save(tmp_path / "a.png")
    photo.crop((40, 30, 440, 330)).save(tmp_path / "b.png")
    out = tmp_path / "why.png"
    done = _sieve_without_torch("explain", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["backend"] == "in-process" and result["heat_peak"] == [] and result["pose"] is None
    assert "[train]" in result["stn_note"]
    pixels = [decode_image((tmp_path / n).read_bytes(), DecodeSettings(), 256).pixels for n in ("a.png", "b.png")]
    embeddings = load_serving(latest_version())(np.stack(pixels))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    assert result["similarity"] == pytest.approx(float(embeddings[0] @ embeddings[1]), abs=1e-4)
    assert result["inliers"] > 12  # the crop's keypoints still matched: verification needs no torch
    assert Image.open(out).width >= 900


def test_sieve_embed_and_dedup_run_without_torch(tmp_path: Path) -> None:
    """Tools people run against a live system use the ONNX model (or Triton), never torch."""
    import numpy as np

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    for args in (
        ["embed", str(folder), "--out", str(tmp_path / "emb.npz")],
        ["dedup", str(folder), "--out", str(tmp_path / "d")],
    ):
        done = _sieve_without_torch(*args)
        assert done.returncode == 0, done.stderr[-2000:]
    with np.load(tmp_path / "emb.npz") as saved:
        assert saved["embeddings"].shape[0] == 3 and str(saved["backend"]) == "in-process"
    assert (tmp_path / "d" / "clusters.json").exists()
