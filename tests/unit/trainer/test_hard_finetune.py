"""The CPU hard-edit fine-tune: batches, schedule, a short real run on the photo set (validation, checkpoint,
resume) and the ship step's refusal to ship what does not beat the served version.

The hard validation set's texture distractors and collage fillers come from Debian packages; here a few
generated pictures stand in for them (the set builder itself is the real one)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.photos.build import Manifest
from services.evaluation.hard_sources import SourceImage
from services.trainer import hard_finetune
from services.trainer.hard_finetune import HardFinetune, HardTuneConfig, ViewCache, lr_factor, sample_batch

SERVED = Path(hard_finetune.MODEL_REPO)


def _cache(n: int = 30, views: int = 4) -> ViewCache:
    rng = np.random.default_rng(0)
    front = rng.standard_normal((n, 1 + views, 2, 3, 3)).astype(np.float16)
    flags = rng.random((n, 1 + views, 5)).astype(np.float32)
    return ViewCache(front, flags, rng.standard_normal((n, 8)).astype(np.float32), np.arange(n) % 3)


def test_batches_are_a_function_of_the_step_with_a_share_from_one_source() -> None:
    cache = _cache()
    cfg = HardTuneConfig(batch_pairs=10, hard_negative_fraction=0.5, original_view_p=0.3)
    a, b = sample_batch(cache, cfg, 7), sample_batch(cache, cfg, 7)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a[4], sample_batch(cache, cfg, 8)[4])
    originals_seen = 0
    for step in range(40):
        fa, fb, _, _, ids, is_original = sample_batch(cache, cfg, step)
        assert len(set(ids.tolist())) == 10
        assert (cache.families[ids[:5].numpy()] == cache.families[int(ids[0])]).all()  # half from one source
        for i, original in enumerate(ids.tolist()):
            first = torch.from_numpy(cache.front[original])
            view_a = next(v for v in range(5) if torch.equal(fa[i], first[v]))
            view_b = next(v for v in range(5) if torch.equal(fb[i], first[v]))
            assert view_a != view_b and view_b != 0 and bool(is_original[i]) == (view_a == 0)
        originals_seen += int(is_original.sum())
    assert 0.15 < originals_seen / 400 < 0.45


def test_the_learning_rate_warms_up_then_decays_to_zero() -> None:
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0)


def _texture(i: int) -> SourceImage:
    rng = np.random.default_rng(100 + i)
    img = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((240, 240), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return SourceImage(f"texture:{i}", buf.getvalue())


@pytest.fixture()
def small_sources(monkeypatch: pytest.MonkeyPatch, photo_set: Manifest) -> None:
    monkeypatch.setattr(hard_finetune, "texture_images", lambda source, limit=None: [_texture(i) for i in range(12)])
    fill = [Image.new("RGB", (200, 200), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    monkeypatch.setattr(hard_finetune, "fillers", lambda: fill)


def test_a_short_run_validates_from_the_served_model_on_checkpoints_and_resumes(
    tmp_path: Path, small_sources: None
) -> None:
    cfg = HardTuneConfig(views=2, batch_pairs=8, total_steps=6, validate_every=3, checkpoint_every=3, warmup_steps=2)
    summary = HardFinetune(cfg, tmp_path, quick=True).run()
    steps = [row["step"] for row in summary["history"]]
    assert steps == [0, 3, 6]
    served = summary["served"]
    assert 0.0 < served["validation"]["micro_ap"] <= 1.0
    assert set(served["validation"]["families"]) == {"crop", "geometric", "overlay", "photometric", "combined"}
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 6 and len(state["history"]) == 3
    assert summary["beats_served"] == (summary["selected"]["step"] > 0)
    assert (tmp_path / "model.pt").exists() == summary["beats_served"]
    rows = (tmp_path / "curve.jsonl").read_text().splitlines()
    assert sum(1 for r in rows if "validation" not in json.loads(r)) == 6

    again = HardFinetune(cfg, tmp_path, quick=True).run()  # resumes at its last step: nothing left to train
    assert [row["step"] for row in again["history"]] == steps
    assert len((tmp_path / "curve.jsonl").read_text().splitlines()) == len(rows)
    with pytest.raises(SystemExit, match="another config"):
        HardFinetune(HardTuneConfig(**{**cfg.__dict__, "temperature": 0.1}), tmp_path, quick=True).run()


def test_shipping_refuses_a_candidate_that_does_not_beat_the_served_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_sources: None
) -> None:
    repo = tmp_path / "sieve_embedder"
    shutil.copytree(SERVED / "2", repo / "2", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(hard_finetune, "MODEL_REPO", repo)
    run = tmp_path / "run"
    run.mkdir()
    cfg = HardTuneConfig()
    summary = {"config": cfg.__dict__, "beats_served": False, "selected": {"step": 0}}
    (run / "summary.json").write_text(json.dumps(summary))
    assert hard_finetune.ship_through_gate(run, quick=True)["shipped"] is False

    # A "candidate" that is the served model itself: the gate passes it (not worse) but it does not beat it.
    shutil.copy2(repo / "2" / "model.pt", run / "model.pt")
    (run / "summary.json").write_text(json.dumps({**summary, "beats_served": True}))
    result = hard_finetune.ship_through_gate(run, quick=True)
    assert result["shipped"] is False and result["gate"]["promote"] is True
    assert result["candidate_micro_ap"] == pytest.approx(result["serving_micro_ap"])
    assert sorted(p.name for p in repo.iterdir()) == ["2"]


def test_the_plan_fills_the_rest_of_the_budget_at_the_measured_rate(tmp_path: Path) -> None:
    run = HardFinetune(HardTuneConfig(validate_every=100), tmp_path)
    assert run._plan(1.0, 10.0, 1000.0, 100.0, 0) == 772  # (950 - 100) s at 1.1 s a step
    assert run._plan(1.0, 10.0, 1000.0, 100.0, 200) == 972  # steps already done count
    assert run._plan(5.0, 10.0, 1000.0, 900.0, 50) == 100  # never fewer than one validation's worth
