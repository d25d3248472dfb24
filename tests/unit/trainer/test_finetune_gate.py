"""Fine-tuning on labelled pairs and the promotion gate, on a small real network (no fakes of torch)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.trainer.finetune import PairBatch, finetune
from services.trainer.gate import gate, pair_f1


class TinyEmbedder(nn.Module):
    """uint8 NHWC in, L2-normalised embedding out, with a ``reduce`` head like the STN embedder's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Conv2d(3, 8, 5, stride=4)
        self.reduce = nn.Linear(8, 16)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0
        x = F.adaptive_avg_pool2d(torch.relu(self.trunk(x)), 1).flatten(1)
        return F.normalize(self.reduce(x), dim=1)


def _pairs(n: int, seed: int) -> PairBatch:
    rng = np.random.default_rng(seed)

    def images(colours: np.ndarray) -> np.ndarray:
        noise = rng.integers(-25, 25, size=(len(colours), 32, 32, 3))
        return np.clip(colours[:, None, None, :] + noise, 0, 255).astype(np.uint8)

    colours = rng.integers(0, 255, size=(n, 3))
    base, noisy = images(colours), images(colours)  # a copy: same content, different noise
    others = images(rng.integers(0, 255, size=(n, 3)))
    left = np.concatenate([base, base])
    right = np.concatenate([noisy, others])
    return PairBatch(left, right, np.asarray([True] * n + [False] * n))


def _embed(module: nn.Module):  # type: ignore[no-untyped-def]
    def fn(pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(pixels)).numpy()

    return fn


def test_finetune_moves_only_the_head_and_lowers_the_loss() -> None:
    model = TinyEmbedder()
    trunk_before = model.trunk.weight.detach().clone()
    result = finetune(model, _pairs(24, 1), threshold=0.9, steps=80, lr=5e-3)
    assert result.trained_parameters == ["reduce.weight", "reduce.bias"]
    assert result.pair_loss_after < result.pair_loss_before
    assert torch.equal(model.trunk.weight, trunk_before)


def test_gate_rejects_a_worse_candidate_and_accepts_a_better_one() -> None:
    serving = TinyEmbedder()
    tuned = TinyEmbedder()
    finetune(tuned, _pairs(24, 1), threshold=0.9, steps=80, lr=5e-3)
    heldout = _pairs(16, 2)
    assert pair_f1(_embed(tuned), heldout, 0.9) >= pair_f1(_embed(serving), heldout, 0.9)
    ok = gate(_embed(serving), _embed(tuned), heldout, 0.9, bench=None)
    assert ok.promote, ok
    broken = TinyEmbedder()
    with torch.no_grad():
        broken.reduce.weight.zero_()
        broken.reduce.bias.fill_(1.0)  # every image maps to one point: every pair looks like a duplicate
    bad = gate(_embed(tuned), _embed(broken), heldout, 0.9, bench=None)
    assert not bad.promote and "feedback_f1" in bad.why


def test_groups_link_images_through_duplicate_labels_only() -> None:
    img = np.zeros((5, 4, 4, 3), np.uint8)
    # u1 and u2 are both copies of o; u3 was judged "not a duplicate" of o; u4 is a copy of u5.
    pairs = PairBatch(
        img,
        img,
        np.asarray([True, True, False, True, False]),
        left_ids=("u1", "u2", "u3", "u4", "u4"),
        right_ids=("o", "o", "o", "u5", "o"),
    )
    g = pairs.groups()
    assert g is not None and len(g) == 10
    group_of = dict(zip([*pairs.left_ids, *pairs.right_ids], g.tolist(), strict=True))  # type: ignore[misc]
    assert group_of["u1"] == group_of["u2"] == group_of["o"]  # linked through o
    assert group_of["u3"] != group_of["o"] and group_of["u4"] == group_of["u5"] != group_of["o"]
    assert PairBatch(img, img, np.ones(5, bool)).groups() is None


def test_unlinked_images_become_negatives_and_stay_apart() -> None:
    """With ids, two labelled copies of different originals are pushed apart too, not only the labelled pairs."""
    base = _pairs(12, 3)
    n = len(base.duplicate) // 2
    ids_left = tuple(f"up{i}" for i in range(n)) + tuple(f"up{i}" for i in range(n))
    ids_right = tuple(f"orig{i}" for i in range(n)) + tuple(f"other{i}" for i in range(n))
    with_ids = PairBatch(base.left, base.right, base.duplicate, ids_left, ids_right)

    def mean_cross_similarity(pairs: PairBatch) -> float:
        model = TinyEmbedder()
        finetune(model, pairs, threshold=0.9, steps=80, lr=5e-3)
        emb = _embed(model)(base.left[:n])
        return float((emb @ emb.T)[np.triu_indices(n, 1)].mean())

    assert mean_cross_similarity(with_ids) < mean_cross_similarity(base) - 0.02


def test_rehearsal_keeps_unlabelled_images_where_the_serving_model_put_them() -> None:
    """The window's images no label mentions drift less when the fine-tune rehearses a sample of them."""
    pairs = _pairs(8, 4)
    window = _pairs(32, 5).right  # unrelated images, as the retention window holds
    reference = _embed(TinyEmbedder())(window)

    def drift(rehearsal: np.ndarray | None) -> float:
        model = TinyEmbedder()
        finetune(model, pairs, threshold=0.9, steps=80, lr=5e-3, rehearsal=rehearsal)
        return float(np.linalg.norm(_embed(model)(window) - reference, axis=1).mean())

    free, rehearsed = drift(None), drift(window[:48])
    assert rehearsed < 0.7 * free, (rehearsed, free)
