"""Fine-tune the served embedder for hard edits within two CPU cores and a time budget.

Why it looks like this (the full recipe of ``sieve train`` costs ~1 s per 16 images on this machine):
- **Frozen front, cached once.** The STN and ``features[:frozen_until]`` keep the served weights. Every
  augmented view passes through them once, when the view is made, and only their fp16 output is kept
  (25 KB a view at the default split), so a training step runs the trunk's top alone: ~6 ms an image forward
  and backward instead of ~45. The stem is ImageNet's generic low-level filters; what hard edits need re-learnt
  is how the top pools and weighs them.
- **SSCD-strength chains** (``augment.HardAugment``): crops to 18%, quarter turns, memes, collages and pictures
  in pictures of other training photos, heavy photometric edits, two to five edits in a row.
- **A queue of negatives, momentum keys** (MoCo): batches of 64 pairs, 4,096 negatives from the queue.
- **Keep what the served model knows:** the trunk moves at a low learning rate, and each original's embedding
  is pulled toward the served model's (``anchor_weight``), so photos unlike the training set keep their place.
- **Honest selection.** The served v2 trained on the train split except 68 originals it held out by group
  (``sieve train``'s validation originals, seed 7). Only those are new to both models, so the selection set is
  built from them: the hard families (services.evaluation.hard_set, as ``bench.hard_edits`` builds its sets)
  among openarena textures, scored every ``validate_every`` steps as descriptor-alone µAP, with the easier
  families watched so they do not regress. A first run selected on the hard benchmark's validation half
  instead, which v2 had trained on: its µAP fell as the fine-tune forgot photos v2 had memorised, which says
  nothing about photos neither has seen. Training uses the rest of the train split, as v2 did. Step 0 is the
  served model itself (the same cached front), so "beats the served one" compares like with like; the promotion
  gate checks the same set. The test set is never touched.
- **Resumable.** Views, the validation front and a checkpoint (weights, momentum keys, optimizer, queue, best
  state, history) live under ``var/trainer/hard/``; a stopped run resumes where it stopped, and the batches are
  a pure function of (seed, step).

``python -m services.trainer.hard_finetune --time-budget 3600`` trains; ``--ship-version 3`` then writes the
selected state to ``model_repo/sieve_embedder/3`` through ``sieve train``'s ship (model card and all) when, and
only when, it beats the served version on validation.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image

from services.common.config import REPO_ROOT
from services.common.models.stn import STNEmbedder, build_stn_embedder
from services.common.photos.build import PhotoRecord, load_photo_set
from services.evaluation.benchmark import FAMILY_EDITS, FAMILY_JPEG, Benchmark, wire_pixels
from services.evaluation.hard_set import HardSet, build_set, sources_of
from services.evaluation.hard_sources import VALIDATION_DISTRACTORS, SourceImage, fillers, texture_images
from services.evaluation.metrics import micro_ap, predictions
from services.trainer.augment import HardAugment, flag_vector, limit_side, to_wire
from services.trainer.export import export_torchscript, load_torchscript
from services.trainer.train import MemoryQueue, info_nce, momentum_update, split_train_val

RUN_DIR = REPO_ROOT / "var" / "trainer" / "hard"
RESULTS_DIR = REPO_ROOT / "bench" / "results"
MODEL_REPO = REPO_ROOT / "model_repo" / "sieve_embedder"
TOP_K = 10


@dataclass(frozen=True)
class HardTuneConfig:
    """Every knob of a run; stored in the checkpoint (a resume must match) and in the model card."""

    base_version: int = 2
    seed: int = 11
    # The served version's own train/validation split (``sieve train``'s defaults): its validation originals
    # are the photos it never saw.
    split_seed: int = 7
    val_fraction: float = 0.15
    views: int = 32
    frozen_until: int = 7
    batch_pairs: int = 64
    temperature: float = 0.07
    queue_size: int = 4096
    queue_start: int = 20
    momentum: float = 0.99
    lr_trunk: float = 3e-5
    lr_head: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 40
    total_steps: int = 2000
    anchor_weight: float = 1.0
    cls_weight: float = 0.1
    original_view_p: float = 0.3
    hard_negative_fraction: float = 0.5
    validate_every: int = 100
    checkpoint_every: int = 50
    threads: int = 2
    max_side: int = 512
    collage_others: int = 24
    # A candidate may trade at most this much µAP on the easier families for its gain on the hard ones.
    easy_tolerance: float = 0.005


def log(message: str) -> None:
    print(f"[hard-finetune {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_served(version: int) -> STNEmbedder:
    """The served TorchScript's weights in the trainable module (the state-dict keys match one to one)."""
    module, meta = load_torchscript(MODEL_REPO / str(version) / "model.pt")
    cfg = meta.get("config", {})
    model = build_stn_embedder(
        use_stn=cfg.get("variant", "stn") == "stn",
        embed_dim=int(cfg.get("embed_dim", 256)),
        input_size=int(cfg.get("input_size", 160)),
    )
    state = {k: v.float() if v.is_floating_point() else v for k, v in module.state_dict().items()}
    model.load_state_dict(state)
    return model.eval()


class Split:
    """The served model cut at ``frozen_until``: a frozen front whose output is cached, and the trained top."""

    def __init__(self, model: STNEmbedder, frozen_until: int) -> None:
        self.model = model
        self.k = frozen_until

    @torch.inference_mode()
    def front(self, pixels: NDArray[np.uint8], batch: int = 64) -> NDArray[np.float16]:
        out = []
        for start in range(0, len(pixels), batch):
            x = self.model.normalise(torch.from_numpy(np.ascontiguousarray(pixels[start : start + batch])))
            warped = self.model.warp(x, self.model.predict_theta(x), self.model.input_size)
            out.append(self.model.features[: self.k](warped).half().numpy())
        return np.concatenate(out)

    def top(self, front: torch.Tensor, model: STNEmbedder | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        m = model or self.model
        x = front.float().contiguous(memory_format=torch.channels_last)
        for layer in list(m.features)[self.k :]:
            x = layer(x)
        pooled = m.pool(x)
        return F.normalize(m.reduce(pooled), dim=1), m.classifier(pooled)

    def trained_parameters(self, model: STNEmbedder) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        trunk = [p for layer in list(model.features)[self.k :] for p in layer.parameters()]
        head = [*model.pool.parameters(), *model.reduce.parameters(), *model.classifier.parameters()]
        return trunk, head


# ------------------------------------------------------------------------------------------------ data


def split_records(cfg: HardTuneConfig) -> tuple[list[PhotoRecord], list[PhotoRecord]]:
    """(training, selection) originals: the served version's own split of the train split, by group."""
    return split_train_val(load_photo_set(), cfg.val_fraction, cfg.split_seed)


@dataclass
class ViewCache:
    front: NDArray[np.float16]  # (N, 1 + views, C, H, W)
    flags: NDArray[np.float32]  # (N, 1 + views, categories)
    anchors: NDArray[np.float32]  # (N, dim): the served model's embedding of each original
    families: NDArray[np.int64]  # source package of each original, for hard-negative batches


def _cache_key(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_views(cfg: HardTuneConfig, split: Split, records: Sequence[PhotoRecord], run_dir: Path) -> ViewCache:
    manifest = load_photo_set()
    key = _cache_key([cfg.base_version, cfg.seed, cfg.views, cfg.frozen_until, cfg.max_side, [r.id for r in records]])
    path = run_dir / f"views-{key}.npz"
    sources = sorted({r.source for r in records})
    families = np.asarray([sources.index(r.source) for r in records], dtype=np.int64)
    if path.exists():
        with np.load(path) as data:
            log(f"views: cached {path.name}")
            return ViewCache(data["front"], data["flags"], data["anchors"], families)
    images = []
    for r in records:
        with Image.open(manifest.path_of(r)) as opened:
            images.append(limit_side(opened, cfg.max_side))
    thumbs = [limit_side(img, 320) for img in images]
    fronts, flags, anchors = [], [], []
    started = time.monotonic()
    for i, img in enumerate(images):
        rng = random.Random(f"{cfg.seed}:{records[i].id}")
        others = [thumbs[j] for j in rng.sample(range(len(images)), k=min(cfg.collage_others + 1, len(images)))]
        augment = HardAugment([o for o in others if o is not thumbs[i]][: cfg.collage_others])
        pixels = [to_wire(img)]
        view_flags = [flag_vector(set(), augment.categories)]
        for _ in range(cfg.views):
            edited, f = augment(img, rng)
            pixels.append(to_wire(edited))
            view_flags.append(f)
        stack = np.stack(pixels)
        fronts.append(split.front(stack))
        flags.append(np.stack(view_flags))
        with torch.inference_mode():
            anchors.append(split.model(torch.from_numpy(stack[:1])).numpy()[0])
        if (i + 1) % 10 == 0 or i + 1 == len(images):
            rate = (time.monotonic() - started) / (i + 1)
            log(f"views: {i + 1}/{len(images)} originals ({rate * (len(images) - i - 1):.0f}s left)")
    cache = ViewCache(np.stack(fronts), np.stack(flags), np.stack(anchors).astype(np.float32), families)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, front=cache.front, flags=cache.flags, anchors=cache.anchors)
    tmp.replace(path)
    return cache


@dataclass
class ValidationFront:
    """A hard set's references and queries through the frozen front, with what scoring needs."""

    name: str
    refs: NDArray[np.float16]
    queries: NDArray[np.float16]
    truth: NDArray[np.int64]
    families: list[str]


def selection_originals(cfg: HardTuneConfig, quick: bool = False) -> list[SourceImage]:
    records = split_records(cfg)[1]
    return sources_of(records[:30] if quick else records)


def validation_sets(cfg: HardTuneConfig, split: Split, run_dir: Path, quick: bool = False) -> list[ValidationFront]:
    """The selection originals under the hard families, and the same originals under the easier families."""
    originals = selection_originals(cfg, quick)
    distractors = texture_images(VALIDATION_DISTRACTORS, limit=100 if quick else None)
    fill = fillers()
    key = _cache_key([cfg.base_version, cfg.frozen_until, quick, [o.id for o in originals], len(distractors)])
    out = []
    for name, families in (("validation", None), ("validation-easier", (FAMILY_EDITS, FAMILY_JPEG))):
        path = run_dir / f"{name}-{key}.npz"
        hard_set: HardSet | None = None
        if not path.exists():
            log(f"{name}: building the set and its front ...")
            hard_set = build_set(
                "selection" if families is None else "selection-easier", originals, distractors, fill, families=families
            )
            refs = split.front(np.stack([wire_pixels(d) for d in hard_set.ref_data]))
            queries = split.front(np.stack([wire_pixels(d) for d in hard_set.query_data]))
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(
                tmp,
                refs=refs,
                queries=queries,
                truth=hard_set.truth_index(),
                families=np.asarray(hard_set.families),
            )
            tmp.replace(path)
        with np.load(path) as data:
            out.append(
                ValidationFront(name, data["refs"], data["queries"], data["truth"], [str(f) for f in data["families"]])
            )
    return out


# ------------------------------------------------------------------------------------------------ training


def sample_batch(
    cache: ViewCache, cfg: HardTuneConfig, step: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two views per original (the first is the original itself with ``original_view_p``); a pure function of
    (seed, step), so a resumed run sees the batches a straight run would."""
    rng = np.random.default_rng([cfg.seed, step])
    n, v = cache.front.shape[:2]
    size = min(cfg.batch_pairs, n)
    labels, counts = np.unique(cache.families, return_counts=True)
    eligible = labels[counts >= 4]
    chosen: NDArray[np.int64]
    if cfg.hard_negative_fraction > 0 and len(eligible):
        members = np.flatnonzero(cache.families == rng.choice(eligible))
        hard = rng.choice(members, size=min(len(members), round(size * cfg.hard_negative_fraction)), replace=False)
        rest = rng.choice(np.setdiff1d(np.arange(n), hard), size=size - len(hard), replace=False)
        chosen = np.concatenate([hard, rest]).astype(np.int64)
    else:
        chosen = rng.choice(n, size=size, replace=False).astype(np.int64)
    first = np.where(rng.random(size) < cfg.original_view_p, 0, rng.integers(1, v, size))
    second = rng.integers(1, v, size)
    clash = second == first
    second[clash] = (second[clash] % (v - 1)) + 1
    return (
        torch.from_numpy(cache.front[chosen, first]),
        torch.from_numpy(cache.front[chosen, second]),
        torch.from_numpy(cache.flags[chosen, first]),
        torch.from_numpy(cache.flags[chosen, second]),
        torch.from_numpy(chosen),
        torch.from_numpy(first == 0),
    )


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def score(split: Split, model: STNEmbedder, sets: Sequence[ValidationFront]) -> dict[str, Any]:
    """Descriptor-alone µAP (top 10, as the benchmark) per set and per family."""
    out: dict[str, Any] = {}
    with torch.inference_mode():

        def embed(front: NDArray[np.float16]) -> NDArray[np.float32]:
            rows = [split.top(torch.from_numpy(front[i : i + 128]), model)[0] for i in range(0, len(front), 128)]
            return torch.cat(rows).numpy()

        for s in sets:
            sim = embed(s.queries) @ embed(s.refs).T
            fam = np.asarray(s.families)
            out[s.name] = {
                "micro_ap": round(micro_ap(predictions(sim, s.truth, TOP_K)), 5),
                "families": {
                    f: round(micro_ap(predictions(sim[fam == f], s.truth[fam == f], TOP_K)), 5)
                    for f in dict.fromkeys(s.families)
                },
            }
    return out


class HardFinetune:
    def __init__(self, cfg: HardTuneConfig, run_dir: Path = RUN_DIR, quick: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.quick = quick
        self.checkpoint = run_dir / "checkpoint.pt"
        self.curve = run_dir / "curve.jsonl"

    def _record(self, row: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.curve.open("a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")

    def _plan(self, step_s: float, validate_s: float, budget_s: float, spent_s: float, done: int) -> int:
        """Total steps: those done, and as many more as the rest of the budget holds at the measured rate."""
        cfg = self.cfg
        per_step = step_s + validate_s / cfg.validate_every
        return max(cfg.validate_every, done + int((0.95 * budget_s - spent_s) / per_step))

    def run(self, time_budget_s: float | None = None, finish: bool = False) -> dict[str, Any]:
        """Trains (or resumes) to the planned step; ``finish``: stop at the checkpoint's step and export the best
        validated state (a run cut short by the clock keeps what it learned)."""
        began = time.monotonic()
        torch.set_num_threads(self.cfg.threads)
        torch.manual_seed(self.cfg.seed)
        served = load_served(self.cfg.base_version)
        split = Split(served, self.cfg.frozen_until)
        records, held = split_records(self.cfg)
        if self.quick:
            records = records[:24]
        log(f"{len(records)} training originals; selection: {len(held)} originals the served version never saw")
        cache = build_views(self.cfg, split, records, self.run_dir)
        sets = validation_sets(self.cfg, split, self.run_dir, self.quick)

        state: dict[str, Any] | None = None
        if self.checkpoint.exists():
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=False)
            saved = HardTuneConfig(**state["config"])
            if replace(saved, total_steps=0) != replace(self.cfg, total_steps=0):
                raise SystemExit(f"{self.checkpoint} was written with another config; move it away or --fresh")
            self.cfg = saved
            log(f"resuming at step {state['step']}/{self.cfg.total_steps}")
        cfg = self.cfg
        model = copy.deepcopy(served)
        keys = copy.deepcopy(served)
        for p in [*model.parameters(), *keys.parameters()]:
            p.requires_grad_(False)
        trunk, head = split.trained_parameters(model)
        for p in [*trunk, *head]:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(
            [{"params": trunk, "lr": cfg.lr_trunk}, {"params": head, "lr": cfg.lr_head}],
            weight_decay=cfg.weight_decay,
        )
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
        queue = MemoryQueue(cfg.queue_size, served.embed_dim)
        history: list[dict[str, Any]] = []
        best: dict[str, Any] = {}
        step = 0
        if state is not None:
            model.load_state_dict(state["model"])
            keys.load_state_dict(state["keys"])
            opt.load_state_dict(state["optimizer"])
            queue.load(state["queue"])
            history, best, step = state["history"], state["best"], int(state["step"])
            if finish:
                cfg = self.cfg = replace(cfg, total_steps=step)
                log(f"finishing at step {step}: the best validated state is step {best['step']}")
        else:
            self.curve.unlink(missing_ok=True)
            t0 = time.monotonic()
            baseline = {"step": 0, **score(split, model, sets), "seconds": round(time.monotonic() - t0, 1)}
            history.append(baseline)
            self._record({"validation": "served", **baseline})
            best = {"step": 0, "score": baseline, "state": None}
            log(f"served v{cfg.base_version} on validation: {self._brief(baseline)}")
        anchors = torch.from_numpy(cache.anchors)
        validate_s = float(history[0].get("seconds", 5.0))
        step_times: list[float] = []
        while step < cfg.total_steps:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, cfg.total_steps, cfg.warmup_steps)
            t0 = time.monotonic()
            stats = self._step(split, model, keys, opt, queue, sample_batch(cache, cfg, step), anchors, step)
            step += 1
            step_times.append(time.monotonic() - t0)
            # Plan the run from the measured step time, then re-plan at every validation through the first
            # quarter: one measurement taken while something else held the cores once planned a quarter of the
            # steps the budget allowed. The cosine schedule follows the current plan.
            replan = step == 10 or (step % cfg.validate_every == 0 and step < cfg.total_steps // 4)
            if time_budget_s is not None and state is None and replan:
                step_s = float(np.median(step_times[-min(len(step_times) - 3, 50) :]))
                total = max(step + 1, self._plan(step_s, validate_s, time_budget_s, time.monotonic() - began, step))
                if total != cfg.total_steps:
                    cfg = self.cfg = replace(cfg, total_steps=total)
                    log(f"time budget {time_budget_s:.0f}s: {step_s:.2f}s a step -> {total} steps")
            self._record({"step": step, **stats, "seconds": round(step_times[-1], 3)})
            if step % 10 == 0:
                log(
                    f"step {step}/{cfg.total_steps} loss {stats['loss']:.4f} nce {stats['nce']:.4f} "
                    f"anchor {stats['anchor']:.4f} pos {stats['pos_sim']:.3f} ({step_times[-1]:.2f}s/step)"
                )
            if step % cfg.validate_every == 0 or step == cfg.total_steps:
                row = {"step": step, **score(split, model, sets)}
                history.append(row)
                self._record({"validation": "periodic", **row})
                if self._better(row, best["score"], history[0]):
                    best = {"step": step, "score": row, "state": self._cpu_state(model)}
                log(f"validation at {step}: {self._brief(row)} (best: step {best['step']})")
            if step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
                self._save(model, keys, opt, queue, step, history, best)
        summary = {
            "config": asdict(cfg),
            "training_originals": len(records),
            "views": int(cache.front.shape[1] - 1),
            "served": history[0],
            "selected": {k: v for k, v in best.items() if k != "state"},
            "beats_served": best["step"] > 0,
            "history": history,
            "seconds_this_invocation": round(time.monotonic() - began, 1),
            "time_budget_s": time_budget_s,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        if best["state"] is not None:
            model.load_state_dict(best["state"])
            export_torchscript(model.eval(), self.run_dir / "model.pt", {"variant": "stn", "config": asdict(cfg)})
        return summary

    def _better(self, row: dict[str, Any], best: dict[str, Any], served: dict[str, Any]) -> bool:
        easier_floor = served["validation-easier"]["micro_ap"] - self.cfg.easy_tolerance
        if row["validation-easier"]["micro_ap"] < easier_floor:
            return False
        return bool(row["validation"]["micro_ap"] > best["validation"]["micro_ap"])

    @staticmethod
    def _brief(row: dict[str, Any]) -> str:
        hard, easy = row["validation"], row["validation-easier"]
        fams = " ".join(f"{k} {v:.3f}" for k, v in hard["families"].items())
        return f"hard µAP {hard['micro_ap']:.4f} ({fams}); easier µAP {easy['micro_ap']:.4f}"

    @staticmethod
    def _cpu_state(model: STNEmbedder) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def _step(
        self,
        split: Split,
        model: STNEmbedder,
        keys: STNEmbedder,
        opt: torch.optim.Optimizer,
        queue: MemoryQueue,
        batch: tuple[torch.Tensor, ...],
        anchors: torch.Tensor,
        step: int,
    ) -> dict[str, float]:
        cfg = self.cfg
        fa, fb, flags_a, flags_b, ids, is_original = batch
        za, la = split.top(fa, model)
        zb, lb = split.top(fb, model)
        with torch.no_grad():
            ka, kb = split.top(fa, keys)[0], split.top(fb, keys)[0]
        nce = info_nce(za, zb, ids, queue if step >= cfg.queue_start else None, cfg.temperature, ka, kb)
        cls = F.binary_cross_entropy_with_logits(la, flags_a) + F.binary_cross_entropy_with_logits(lb, flags_b)
        # The originals in the batch stay where the served model put them (cosine distance to its embedding).
        pulled = (za[is_original] * anchors[ids[is_original]]).sum(1)
        anchor = (1 - pulled).mean() if len(pulled) else za.sum() * 0
        loss = nce + cfg.cls_weight * cls + cfg.anchor_weight * anchor
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        with torch.no_grad():
            momentum_update(keys, model, cfg.momentum)
            queue.push(torch.cat([ka, kb]), torch.cat([ids, ids]))
            positive = (za * kb).sum(1).mean().item()
        return {
            "loss": round(loss.item(), 5),
            "nce": round(nce.item(), 5),
            "cls": round(cls.item(), 5),
            "anchor": round(float(anchor.item()), 5),
            "pos_sim": round(positive, 4),
        }

    def _save(
        self,
        model: STNEmbedder,
        keys: STNEmbedder,
        opt: torch.optim.Optimizer,
        queue: MemoryQueue,
        step: int,
        history: list[dict[str, Any]],
        best: dict[str, Any],
    ) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint.with_suffix(".tmp")
        torch.save(
            {
                "config": asdict(self.cfg),
                "step": step,
                "model": model.state_dict(),
                "keys": keys.state_dict(),
                "optimizer": opt.state_dict(),
                "queue": queue.state(),
                "history": history,
                "best": best,
            },
            tmp,
        )
        tmp.replace(self.checkpoint)


# ------------------------------------------------------------------------------------------------ shipping


def hard_validation_benchmark(cfg: HardTuneConfig, quick: bool = False) -> Benchmark:
    """The selection set as the promotion gate's benchmark (wire pixels, decoded as the server does): data the
    serving version never saw, which is what the gate asks for."""
    distractors = texture_images(VALIDATION_DISTRACTORS, limit=100 if quick else None)
    hard_set = build_set("selection", selection_originals(cfg, quick), distractors, fillers())
    return Benchmark(
        name="hard-validation",
        reference_ids=hard_set.ref_ids,
        reference_pixels=np.stack([wire_pixels(d) for d in hard_set.ref_data]),
        query_ids=hard_set.query_ids,
        query_families=hard_set.families,
        query_truth=hard_set.truth,
        query_edits=hard_set.edits,
        query_pixels=np.stack([wire_pixels(d) for d in hard_set.query_data]),
        meta=hard_set.summary(),
    )


def thinned_curve(curve: Path, every: int = 10) -> list[dict[str, Any]]:
    """Every validation row and every ``every``-th training step: the shape of the run in a few KB."""
    rows = [json.loads(line) for line in curve.read_text().splitlines() if line.strip()]
    return [r for r in rows if "validation" in r or int(r.get("step", 0)) % every == 0]


def ship_through_gate(run_dir: Path = RUN_DIR, quick: bool = False, version: int | None = None) -> dict[str, Any]:
    """The selected state becomes the next version only if the promotion gate passes it and it beats the
    served version on the hard validation set (the gate alone allows a tie within its tolerance)."""
    from services.trainer.cli import ship
    from services.trainer.export import embed_fn
    from services.trainer.finetune import PairBatch
    from services.trainer.gate import gate

    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = HardTuneConfig(**summary["config"])
    candidate_path = run_dir / "model.pt"
    if not summary["beats_served"] or not candidate_path.exists():
        return {"shipped": False, "why": "no validated state beat the served version during training"}
    torch.set_num_threads(cfg.threads)
    served_module = load_torchscript(MODEL_REPO / str(cfg.base_version) / "model.pt")[0]
    candidate_module = load_torchscript(candidate_path)[0]
    bench = hard_validation_benchmark(cfg, quick)
    empty = np.zeros((0, 256, 256, 3), np.uint8)
    no_labels = PairBatch(empty, empty, np.zeros(0, bool))
    served_card = json.loads((MODEL_REPO / str(cfg.base_version) / "model_card.json").read_text())
    verdict = gate(
        embed_fn(served_module), embed_fn(candidate_module), no_labels, served_card["duplicate_threshold"], bench
    )
    served_ap = verdict.serving["benchmark_micro_ap"]
    candidate_ap = verdict.candidate["benchmark_micro_ap"]
    record: dict[str, Any] = {"gate": {"promote": verdict.promote, "why": verdict.why}}
    record.update(serving_micro_ap=served_ap, candidate_micro_ap=candidate_ap)
    if not verdict.promote or candidate_ap <= served_ap:
        return {"shipped": False, "why": f"gate: {verdict.why}; {candidate_ap:.4f} vs served {served_ap:.4f}", **record}
    target_version = version or max(int(p.name) for p in MODEL_REPO.iterdir() if p.name.isdigit()) + 1
    selected = summary["selected"]
    compat = {
        "variant": "hard",
        "config": {**asdict(cfg), "embed_dim": 256, "views": cfg.views},
        "train_originals": summary["training_originals"],
        "validation_originals": bench.meta["photo_references"],
        "validation": {"threshold": served_card["duplicate_threshold"], **selected["score"]["validation"]},
        "device": "cpu",
        "selected_step": selected["step"],
        "train_seconds_this_invocation": summary["seconds_this_invocation"],
    }
    curve_path = RESULTS_DIR / "train_hard.jsonl"
    curve_path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in thinned_curve(run_dir / "curve.jsonl")))
    target = ship(candidate_path, compat, target_version, loader=MODEL_REPO / str(cfg.base_version) / "model.py")
    card_path = target / "model_card.json"
    card = json.loads(card_path.read_text())
    card.update(
        {
            "architecture": f"sieve_embedder:{cfg.base_version} fine-tuned for hard edits: {card['architecture']}",
            "training_recipe": {
                "module": "services.trainer.hard_finetune",
                "why": (__doc__ or "").strip().split("\n\n")[1],
                "starts_from": f"sieve_embedder:{cfg.base_version} (served weights)",
                "frozen": f"STN and features[:{cfg.frozen_until}] (their output cached once per view)",
                "config": asdict(cfg),
                "device": "cpu (2 cores)",
                "time_budget_s": summary.get("time_budget_s"),
                "seconds": summary["seconds_this_invocation"],
                "selected_step": selected["step"],
            },
            "curves": {
                "log": str(curve_path.relative_to(REPO_ROOT)),
                "validation": [
                    {
                        "step": r["step"],
                        "hard": r["validation"]["micro_ap"],
                        "easier": r["validation-easier"]["micro_ap"],
                    }
                    for r in summary["history"]
                ],
            },
            "promotion_gate": record,
            "duplicate_threshold": served_card["duplicate_threshold"],
            "duplicate_threshold_note": "provisional (the previous version's): python -m bench.hard_edits "
            "calibrates this version's fused threshold on validation and --update-card records it",
        }
    )
    card.pop("validation", None)
    card["validation"] = {"hard": selected["score"]["validation"], "easier": selected["score"]["validation-easier"]}
    card_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return {"shipped": True, "version": target_version, **record}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run (sizes the steps)")
    parser.add_argument("--steps", type=int, default=None, help="total steps (ignored when a budget is given)")
    parser.add_argument("--views", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--base-version", type=int, default=None, help="the served version to start from")
    parser.add_argument("--frozen-until", type=int, default=None, help="features[:N] stay frozen (cached)")
    parser.add_argument("--seed", type=int, default=None, help="augmentation seed (a new one draws new views)")
    parser.add_argument("--run-dir", default=str(RUN_DIR))
    parser.add_argument("--fresh", action="store_true", help="drop the checkpoint (cached views are kept)")
    parser.add_argument("--finish", action="store_true", help="stop at the checkpoint and export the best state")
    parser.add_argument("--quick", action="store_true", help="24 originals and a small validation set")
    parser.add_argument("--ship", action="store_true", help="only: put the trained state through the gate and ship")
    parser.add_argument("--ship-version", type=int, default=None, help="default: the next free version number")
    args = parser.parse_args(argv)
    if args.ship:
        print(json.dumps(ship_through_gate(Path(args.run_dir), args.quick, args.ship_version), indent=2))
        return 0
    cfg = HardTuneConfig()
    overrides = {
        "total_steps": args.steps,
        "views": args.views,
        "threads": args.threads,
        "base_version": args.base_version,
        "frozen_until": args.frozen_until,
        "seed": args.seed,
    }
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    run_dir = Path(args.run_dir)
    if args.fresh:
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    summary = HardFinetune(cfg, run_dir, quick=args.quick).run(args.time_budget, finish=args.finish)
    print(json.dumps({k: summary[k] for k in ("served", "selected", "beats_served")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
