"""The contrastive trainer: batch composition, device-neutral sampling, best-state selection and the state
file that carries a GPU run back to be exported here. Runs the real network on the real photo set, briefly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.common.photos.build import Manifest
from services.trainer import train
from services.trainer.export import load_torchscript
from services.trainer.train import TrainConfig, Trainer, ViewBank, _choose_originals, sample_batch


def _bank(n: int = 40, views: int = 3) -> ViewBank:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(n, 1 + views, 8, 8, 3), dtype=np.uint8)
    flags = rng.random((n, 1 + views, 5)).astype(np.float32)
    return ViewBank(pixels, flags, [f"p{i}" for i in range(n)])


def test_hard_negative_batches_draw_a_share_from_one_family_and_never_repeat_an_original() -> None:
    families = np.array([0] * 20 + [1] * 12 + [2] * 6 + [3] * 2)  # family 3 is too small to be drilled
    cfg = TrainConfig(batch_pairs=16, hard_negative_fraction=0.5)
    drilled = set()
    for step in range(60):
        chosen = _choose_originals(np.random.default_rng([cfg.seed, step]), len(families), cfg, families)
        assert len(chosen) == 16 and len(set(chosen.tolist())) == 16
        family = int(families[chosen[0]])
        hard = min(8, int((families == family).sum()))  # half the batch, or the whole family if smaller
        assert (families[chosen[:hard]] == family).all()
        drilled.add(family)
    assert drilled == {0, 1, 2}  # every eligible family gets drilled, uniformly chosen
    uniform = _choose_originals(np.random.default_rng(1), len(families), TrainConfig(batch_pairs=16), families)
    assert len(set(uniform.tolist())) == 16


def test_sampling_is_a_pure_function_of_the_step_whether_the_bank_is_an_array_or_a_tensor() -> None:
    bank = _bank()
    cfg = TrainConfig(batch_pairs=8, hard_negative_fraction=0.5)
    families = np.arange(40) % 3
    as_array = sample_batch(bank, cfg, 5, families)
    as_tensor = sample_batch(ViewBank(torch.from_numpy(bank.pixels), bank.flags, bank.ids), cfg, 5, families)
    again = sample_batch(bank, cfg, 5, families)
    other_step = sample_batch(bank, cfg, 6, families)
    for a, b, c in zip(as_array, as_tensor, again, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(as_array[4], other_step[4])
    xa, xb, _, _, ids = as_array
    for i, original in enumerate(ids.tolist()):
        views = [torch.from_numpy(bank.pixels[original, v]) for v in range(4)]
        first = next(v for v, px in enumerate(views) if torch.equal(xa[i], px))
        second = next(v for v, px in enumerate(views) if torch.equal(xb[i], px))
        assert first != second and second != 0  # two different views; the second is always an edited copy


def test_a_run_keeps_its_best_validated_state_and_the_state_file_exports_to_the_same_network(
    photo_set: Manifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train, "VAR_DIR", tmp_path / "var")
    cfg = TrainConfig(
        views=1, batch_pairs=4, stage1_steps=1, stage2_steps=2, validate_every=1, warmup_steps=1,
        queue_size=16, queue_start=1, hard_negative_fraction=0.5,
    )  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "run", tmp_path / "loss.jsonl", export=False)
    summary = trainer.run()
    validations = [h for h in summary["history"] if "micro_ap" in h]
    assert [h["step"] for h in validations] == [1, 2, 3]
    best = max(validations, key=lambda h: h["micro_ap"])
    assert summary["selected_step"] == best["step"]
    assert summary["validation"]["micro_ap"] == best["micro_ap"]
    state = torch.load(tmp_path / "run" / "state.pt", map_location="cpu", weights_only=True)
    assert state["selected_step"] == best["step"] and state["config"]["validate_every"] == 1
    assert all(v.dtype == torch.float16 for v in state["model"].values() if v.is_floating_point())

    imported = Trainer(TrainConfig(), tmp_path / "imported" / "stn", tmp_path / "imported.jsonl")
    result = imported.import_state(tmp_path / "run" / "state.pt")
    _, meta = load_torchscript(Path(result["model_path"]))
    assert meta["use_stn"] and result["config"] == state["config"]
    # The fp16 state exports to exactly the validated network: same µAP as the selected step, to rounding.
    assert result["validation"]["micro_ap"] == pytest.approx(best["micro_ap"], abs=0.01)
    loss_rows = (tmp_path / "loss.jsonl").read_text().splitlines()
    assert len([r for r in loss_rows if '"loss"' in r]) == 3
