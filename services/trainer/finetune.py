"""Fine-tunes the serving embedder on reviewer labels, starting from exactly the model Triton serves.

Only the embedding head (and the flag head, when category labels exist) moves: the labels are few, so the trunk
and the spatial transformer stay as trained. Confirmed duplicates are pulled above the decision threshold (by a
margin, not towards 1.0: pulling everything together is the cheapest way to do that and raises every
similarity), "not a duplicate" pairs pushed below it, every two labelled images that no label ties together
serve as extra negatives (the hard ones, such as two photos of one person, are exactly what the labels are
about), and a distillation term keeps the labelled images and a rehearsal sample of the retention window (the
images the index holds, which no label mentions) where they were, so a handful of labels cannot wreck the space
the index was built in.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from numpy.typing import NDArray

HEAD_PREFIXES = ("reduce.", "pool.")
T = TypeVar("T")


@dataclass(frozen=True)
class PairBatch:
    left: NDArray[np.uint8]  # (n, 256, 256, 3)
    right: NDArray[np.uint8]
    duplicate: NDArray[np.bool_]
    # Upload ids of each side; with them, images of different pairs that no duplicate label links become
    # negatives of each other. Without them only the labelled pairs count.
    left_ids: tuple[str, ...] | None = None
    right_ids: tuple[str, ...] | None = None

    def groups(self) -> NDArray[np.int64] | None:
        """A group per image (left then right): images linked by duplicate labels, directly or in a chain."""
        if self.left_ids is None or self.right_ids is None:
            return None
        ids = [*self.left_ids, *self.right_ids]
        parent = {u: u for u in ids}

        def find(u: str) -> str:
            while parent[u] != u:
                parent[u] = parent[parent[u]]
                u = parent[u]
            return u

        for a, b, dup in zip(self.left_ids, self.right_ids, self.duplicate, strict=True):
            if dup:
                parent[find(a)] = find(b)
        roots: dict[str, int] = {}
        return np.asarray([roots.setdefault(find(u), len(roots)) for u in ids], dtype=np.int64)


@dataclass(frozen=True)
class FinetuneResult:
    steps: int
    pair_loss_before: float  # over every labelled pair, without the distillation term
    pair_loss_after: float
    trained_parameters: list[str]


def pair_loss(module: torch.nn.Module, pairs: PairBatch, threshold: float, margin: float) -> float:
    with torch.no_grad():
        sim = (module(torch.from_numpy(pairs.left)) * module(torch.from_numpy(pairs.right))).sum(dim=1)
        dup = torch.from_numpy(pairs.duplicate)
        losses = torch.cat([torch.relu((threshold + margin) - sim)[dup], torch.relu(sim - (threshold - margin))[~dup]])
        return round(float(losses.mean()), 5)


def trainable(module: torch.nn.Module) -> list[str]:
    names = []
    for name, param in module.named_parameters():
        train = name.startswith(HEAD_PREFIXES)
        param.requires_grad_(train)
        if train:
            names.append(name)
    return names


def finetune(
    module: torch.nn.Module,
    pairs: PairBatch,
    threshold: float,
    steps: int = 60,
    lr: float = 1e-3,
    margin: float = 0.1,
    seed: int = 7,
    batch: int = 16,
    rehearsal: NDArray[np.uint8] | None = None,
    rehearsal_weight: float = 1.0,
) -> FinetuneResult:
    """In place. ``module`` maps uint8 NHWC to L2-normalised embeddings (TorchScript or eager).

    ``rehearsal``: unlabelled images from the retention window; each step keeps a sample of them where the
    serving model put them, which is what stops the head from pulling unrelated photos together.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    names = trainable(module)
    if not names:
        raise ValueError("the serving model has no head to fine-tune")
    before = pair_loss(module, pairs, threshold, margin)
    with torch.no_grad():
        anchor_left = module(torch.from_numpy(pairs.left)).detach()
        anchor_right = module(torch.from_numpy(pairs.right)).detach()
        window = rehearsal if rehearsal is not None else np.zeros((0, *pairs.left.shape[1:]), np.uint8)
        window_ref = _embed_chunks(module, window)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    module.train()
    n = len(pairs.duplicate)
    groups = pairs.groups()
    for _ in range(steps):
        idx = rng.sample(range(n), min(batch, n))
        left = module(torch.from_numpy(pairs.left[idx]))
        right = module(torch.from_numpy(pairs.right[idx]))
        sim = (left * right).sum(dim=1)
        dup = torch.from_numpy(pairs.duplicate[idx])
        pos = torch.relu((threshold + margin) - sim)[dup]
        neg = torch.relu(sim - (threshold - margin))[~dup]
        terms = [pos, neg]
        if groups is not None:
            g = torch.from_numpy(np.concatenate([groups[idx], groups[[i + n for i in idx]]]))
            both = torch.cat([left, right])
            unlinked = g[:, None] != g[None, :]
            terms.append(torch.relu(both @ both.T - (threshold - margin))[torch.triu(unlinked, diagonal=1)])
        batch_pair_loss = torch.cat(terms).mean()
        keep = ((left - anchor_left[idx]) ** 2).sum(1).mean() + ((right - anchor_right[idx]) ** 2).sum(1).mean()
        loss = batch_pair_loss + 0.5 * keep
        if len(window):
            widx = rng.sample(range(len(window)), min(2 * batch, len(window)))
            moved = module(torch.from_numpy(window[widx])) - window_ref[widx]
            loss = loss + rehearsal_weight * (moved**2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return FinetuneResult(steps, before, pair_loss(module, pairs, threshold, margin), names)


def rehearsal_choice(candidates: Sequence[T], n: int) -> list[T]:
    """The rehearsal sample: ``n`` of the unlabelled window, seeded by its size so a rerun picks the same."""
    return random.Random(len(candidates)).sample(list(candidates), min(n, len(candidates)))


def _embed_chunks(module: torch.nn.Module, pixels: NDArray[np.uint8], chunk: int = 32) -> torch.Tensor:
    if not len(pixels):
        return torch.zeros((0, 0))
    return torch.cat([module(torch.from_numpy(pixels[i : i + chunk])).detach() for i in range(0, len(pixels), chunk)])


def save_like_serving(module: torch.jit.ScriptModule, path: Path, meta: dict[str, Any]) -> Path:
    """Same storage convention as the shipped version (fp16 weights, fp32 compute)."""
    import json

    from services.trainer.export import META_FILE

    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and name not in ("mean", "std"):
                tensor.data = tensor.data.half()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(module, str(path), _extra_files={META_FILE: json.dumps(meta, sort_keys=True)})
    module.float()
    return path
