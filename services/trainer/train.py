"""Self-supervised contrastive training of the STN embedder on the real-photo set, on a CPU or one GPU.

Why it looks like this:
- Views are generated once up front (PIL edits are cheap next to the network; ~5 ms a view), so the training
  loop is pure tensor work and every step of a seeded run sees the same batch, resumed or not.
- InfoNCE with in-batch negatives plus a cross-batch memory queue of past embeddings: a CPU batch is small,
  the queue supplies thousands of negatives. Entries of the same original are masked. Keys (positives, in-batch
  negatives and what enters the queue) come from a momentum (EMA) copy of the network, as in MoCo: with
  keys from the trained network itself (XBM-style) the first run here collapsed in stage 2, because the
  cheapest way to lower the loss was to drift every embedding away from the stale queue together.
- Two stages: heads (and the localisation net) on a frozen ImageNet trunk, then a fine-tune of the trunk
  from ``features[7]`` up at a lower rate (the high-resolution stem is generic and the costliest to train).
  BatchNorm stays in inference mode throughout: batches of 64 from ~400 photos would only add noise.
- An auxiliary penalty keeps θ near the identity, so the STN only warps when it pays off in the loss. At the
  first weight tried on the GPU (0.05) the warp drifted far from the identity within 100 steps (mean squared
  distance ~1) and the STN lost to the ablation; at 1.0 it settles near 0.2 and wins on geometric edits.
- Hard-negative batches (``hard_negative_fraction``): half of each batch from one source, so different faces
  and different star fields meet as negatives every few steps; the served v2 was trained with 0.5.
- Validation (hyper-parameters, the duplicate threshold) uses originals carved from the TRAIN split by
  group; the held-out split is only ever touched by ``sieve eval``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from services.common.config import REPO_ROOT
from services.common.models.stn import STNEmbedder, build_stn_embedder, theta_regulariser
from services.common.photos.build import Manifest, PhotoRecord, load_photo_set
from services.evaluation.benchmark import Benchmark, build_benchmark
from services.evaluation.metrics import best_f1_threshold, evaluate, top_k
from services.trainer.augment import pregenerate
from services.trainer.export import export_torchscript, load_torchscript

VAR_DIR = REPO_ROOT / "var" / "trainer"
RESULTS_DIR = REPO_ROOT / "bench" / "results"


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run; stored in checkpoints (a resume must match) and in the model card."""

    variant: str = "stn"  # "stn" or "no_stn" (the ablation: identical except for the learned warp)
    seed: int = 7
    embed_dim: int = 256
    input_size: int = 160
    views: int = 16
    batch_pairs: int = 32
    stage1_steps: int = 30
    stage2_steps: int = 60
    trainable_from: int = 7  # stage 2 fine-tunes features[7:]; the high-resolution stem stays ImageNet's
    lr_head: float = 1e-3
    lr_loc: float = 3e-4
    lr_trunk: float = 5e-5
    lr_head_stage2: float = 3e-4
    # PCA initialisation of the projection was tried and lost on validation (µAP 0.64 at init, 0.72 after
    # stage 1, against 0.81 from the default random init), so it is off unless asked for.
    pca_init: bool = False
    pca_views: int = 3  # views per original (plus the original) used for that PCA
    weight_decay: float = 0.01
    warmup_steps: int = 5
    temperature: float = 0.07
    queue_size: int = 2048
    # EMA of the key network. MoCo's 0.999 suits 100k+ steps; in a 100-step run 0.97 left the keys ~30 steps
    # behind (validation 0.72 after stage 1), 0.9 keeps them a few steps behind yet anchored.
    momentum: float = 0.9
    queue_start: int = 10  # steps into each stage before the queue is used (embeddings drift fastest early)
    cls_weight: float = 0.1
    theta_weight: float = 0.05
    grad_clip: float = 5.0
    val_fraction: float = 0.15
    checkpoint_every: int = 20
    threads: int = 2
    # Share of each batch drawn from one source (faces, sky, ...): different photos of one kind of scene are
    # the negatives a deployed model confuses, and uniform batches rarely hold enough of them together.
    hard_negative_fraction: float = 0.0
    # Validate every N steps and export the best state (0: only at the stage switch and the end).
    validate_every: int = 0

    @property
    def use_stn(self) -> bool:
        return self.variant == "stn"

    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps


def stable_fraction(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def split_train_val(manifest: Manifest, fraction: float, seed: int) -> tuple[list[PhotoRecord], list[PhotoRecord]]:
    """Validation originals come from the train split, chosen by group so near-identical photos never straddle."""
    train: list[PhotoRecord] = []
    val: list[PhotoRecord] = []
    for record in sorted(manifest.split("train"), key=lambda r: r.id):
        (val if stable_fraction(f"val:{seed}:{record.group}") < fraction else train).append(record)
    return train, val


# ------------------------------------------------------------------------------------------------ data


@dataclass
class ViewBank:
    """(N, 1 + views, 256, 256, 3) uint8 wire pixels, flags per view, and one id per original."""

    pixels: NDArray[np.uint8] | torch.Tensor  # a tensor once moved to the training device
    flags: NDArray[np.float32]
    ids: list[str]


def load_views(
    manifest: Manifest, records: list[PhotoRecord], cfg: TrainConfig, log: Callable[[str], None]
) -> ViewBank:
    key = hashlib.sha256(json.dumps([cfg.seed, cfg.views, [r.file_sha256 for r in records]]).encode()).hexdigest()
    cache = VAR_DIR / f"views-{key[:16]}.npz"
    ids = [r.id for r in records]
    if cache.exists():
        with np.load(cache) as data:
            log(f"views: cached {cache.name}")
            return ViewBank(data["pixels"], data["flags"], ids)
    started = time.monotonic()
    log(f"views: generating {cfg.views} augmented views for {len(records)} originals ...")
    pixels, flags = pregenerate([str(manifest.path_of(r)) for r in records], cfg.views, cfg.seed, workers=cfg.threads)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, pixels=pixels, flags=flags)
    tmp.replace(cache)
    log(f"views: {pixels.shape} in {time.monotonic() - started:.0f}s")
    return ViewBank(pixels, flags, ids)


def sample_batch(
    bank: ViewBank, cfg: TrainConfig, step: int, families: NDArray[np.int64] | None = None
) -> tuple[torch.Tensor, ...]:
    """A pure function of (seed, step): resuming replays exactly the batches a straight run would see."""
    rng = np.random.default_rng([cfg.seed, step])
    n, v = bank.pixels.shape[:2]
    chosen = _choose_originals(rng, n, cfg, families)
    first = np.where(rng.random(len(chosen)) < 0.5, 0, rng.integers(1, v, len(chosen)))
    second = rng.integers(1, v, len(chosen))
    clash = second == first
    second[clash] = (second[clash] % (v - 1)) + 1
    pixels = bank.pixels if isinstance(bank.pixels, torch.Tensor) else torch.from_numpy(bank.pixels)
    # Gather where the bank lives (the accelerator, once moved there): only indices cross the bus.
    index = torch.from_numpy(chosen).to(pixels.device)
    return (
        pixels[index, torch.from_numpy(first).to(pixels.device)],
        pixels[index, torch.from_numpy(second).to(pixels.device)],
        torch.from_numpy(bank.flags[chosen, first]).to(pixels.device),
        torch.from_numpy(bank.flags[chosen, second]).to(pixels.device),
        index,
    )


def _choose_originals(
    rng: np.random.Generator, n: int, cfg: TrainConfig, families: NDArray[np.int64] | None
) -> NDArray[np.int64]:
    """Uniform originals, or with ``hard_negative_fraction`` part of the batch from one family picked per step
    (uniformly over families, so a small family such as faces is drilled as often as a large one)."""
    size = min(cfg.batch_pairs, n)
    eligible = np.zeros(0, np.int64)
    if families is not None and cfg.hard_negative_fraction > 0:
        labels, counts = np.unique(families, return_counts=True)
        eligible = labels[counts >= 4]
    if families is None or len(eligible) == 0:
        uniform: NDArray[np.int64] = rng.choice(n, size=size, replace=False).astype(np.int64)
        return uniform
    family = rng.choice(eligible)
    members = np.flatnonzero(families == family)
    hard = rng.choice(members, size=min(len(members), round(size * cfg.hard_negative_fraction)), replace=False)
    rest = np.setdiff1d(np.arange(n), hard)
    easy = rng.choice(rest, size=size - len(hard), replace=False)
    mixed: NDArray[np.int64] = np.concatenate([hard, easy]).astype(np.int64)
    return mixed


# ------------------------------------------------------------------------------------------------ loss


class MemoryQueue:
    """Ring buffer of detached embeddings and the original each came from (-1 = empty slot)."""

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.embeddings = torch.zeros(size, dim, device=device)
        self.ids = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.ptr = 0

    def push(self, embeddings: torch.Tensor, ids: torch.Tensor) -> None:
        size = self.embeddings.shape[0]
        if size == 0:
            return
        idx = (torch.arange(len(ids), device=ids.device) + self.ptr) % size
        self.embeddings[idx] = embeddings.detach().to(self.embeddings.dtype)
        self.ids[idx] = ids
        self.ptr = int((self.ptr + len(ids)) % size)

    def reset(self) -> None:
        self.ids.fill_(-1)
        self.ptr = 0

    def state(self) -> dict[str, Any]:
        return {"embeddings": self.embeddings.cpu(), "ids": self.ids.cpu(), "ptr": self.ptr}

    def load(self, state: dict[str, Any]) -> None:
        device = self.embeddings.device
        self.embeddings, self.ids = state["embeddings"].to(device), state["ids"].to(device)
        self.ptr = int(state["ptr"])


def info_nce(
    za: torch.Tensor,
    zb: torch.Tensor,
    ids: torch.Tensor,
    queue: MemoryQueue | None,
    temperature: float,
    ka: torch.Tensor | None = None,
    kb: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE: each view must pick its partner's key among the batch's keys and the queue (own
    copies masked). Without momentum keys (ka, kb) the partner's own embedding is the key."""
    targets = torch.arange(len(za), device=za.device)
    losses = []
    keys_b = zb if kb is None else kb
    keys_a = za if ka is None else ka
    for anchor, other in ((za, keys_b), (zb, keys_a)):
        logits = anchor @ other.T / temperature
        if queue is not None:
            valid = queue.ids >= 0
            bank = queue.embeddings[valid]
            q_logits = anchor @ bank.T / temperature
            same = ids[:, None] == queue.ids[valid][None, :]
            q_logits = q_logits.masked_fill(same, float("-inf"))
            logits = torch.cat([logits, q_logits], dim=1)
        losses.append(F.cross_entropy(logits, targets))
    return (losses[0] + losses[1]) / 2


def momentum_update(keys: torch.nn.Module, model: torch.nn.Module, momentum: float) -> None:
    """The key network follows the trained one as an exponential moving average (MoCo's momentum encoder)."""
    with torch.no_grad():
        for pk, pq in zip(keys.parameters(), model.parameters(), strict=True):
            pk.mul_(momentum).add_(pq.detach(), alpha=1.0 - momentum)


# ------------------------------------------------------------------------------------------------ loop


def _param_groups(model: STNEmbedder, cfg: TrainConfig, stage: int) -> list[dict[str, Any]]:
    head = [*model.reduce.parameters(), *model.classifier.parameters(), *model.pool.parameters()]
    groups: list[dict[str, Any]] = [{"params": head, "lr": cfg.lr_head if stage == 1 else cfg.lr_head_stage2}]
    if model.use_stn:
        groups.append({"params": list(model.loc.parameters()), "lr": cfg.lr_loc})
    if stage == 2:
        trunk = [p for layer in list(model.features)[cfg.trainable_from :] for p in layer.parameters()]
        groups.append({"params": trunk, "lr": cfg.lr_trunk})
    return groups


def _set_stage(model: STNEmbedder, cfg: TrainConfig, stage: int) -> torch.optim.AdamW:
    for i, layer in enumerate(model.features):
        for p in layer.parameters():
            p.requires_grad_(stage == 2 and i >= cfg.trainable_from)
    if not model.use_stn:
        for p in model.loc.parameters():
            p.requires_grad_(False)
    groups = _param_groups(model, cfg, stage)
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def _lr_factor(step_in_stage: int, stage_steps: int, warmup: int) -> float:
    if step_in_stage < warmup:
        return (step_in_stage + 1) / warmup
    progress = (step_in_stage - warmup) / max(1, stage_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def embed_pixels(
    fn: Callable[[torch.Tensor], torch.Tensor],
    pixels: NDArray[np.uint8],
    batch: int = 64,
    device: torch.device | str = "cpu",
) -> NDArray[Any]:
    out = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch):
            chunk = torch.from_numpy(np.ascontiguousarray(pixels[start : start + batch])).to(device)
            out.append(fn(chunk).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def validate(
    fn: Callable[[torch.Tensor], torch.Tensor], bench: Benchmark, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """µAP and recall@P90 on the validation benchmark, and the F1-optimal duplicate threshold there."""
    refs = embed_pixels(fn, bench.reference_pixels, device=device)
    queries = embed_pixels(fn, bench.query_pixels, device=device)
    sim = queries @ refs.T
    truth = bench.truth_index()
    idx, scores = top_k(sim, 1)
    calibrated = best_f1_threshold(scores[:, 0], idx[:, 0] == truth, truth >= 0)
    metrics = evaluate(sim, truth, calibrated.threshold)
    return {k: float(v) for k, v in metrics.items()}


def init_projection_by_pca(model: STNEmbedder, bank: ViewBank, views: int, batch: int = 64) -> dict[str, float]:
    """Start the 1280 -> d projection as the PCA of ImageNet GeM features of training images.

    A random projection throws away much of what the pretrained trunk already knows; the PCA keeps the
    dominant directions (and centring alone helps cosine retrieval), so training starts at least as good as
    the v1 baseline in a fifth of its dimensions and the momentum keys do not lag a random head.
    """
    pixels = bank.pixels[:, : views + 1].reshape(-1, *bank.pixels.shape[2:])
    feats = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch):
            x = model.normalise(torch.from_numpy(np.ascontiguousarray(pixels[start : start + batch])))
            warped = model.warp(x, model.predict_theta(x), model.input_size)
            feats.append(model.pool(model.features(warped)).double())
    data = torch.cat(feats)
    mean = data.mean(dim=0)
    _, singular, vt = torch.linalg.svd(data - mean, full_matrices=False)
    basis = vt[: model.embed_dim]
    with torch.no_grad():
        model.reduce.weight.copy_(basis.float())
        model.reduce.bias.copy_((-basis @ mean).float())
    explained = float((singular[: model.embed_dim] ** 2).sum() / (singular**2).sum())
    return {"pca_samples": float(len(data)), "pca_explained_variance": round(explained, 4)}


class Trainer:
    """One run: ``run()`` resumes from ``checkpoint.pt`` in its folder when the config matches.

    On a GPU (``device="cuda"``) the view bank lives on the device and the passes run under bf16 autocast.
    ``time_budget_s`` sizes both stages from a measured step time before the first step, so a leased
    accelerator is used to the end without overrunning it; the chosen step counts go into the config, so the
    run can be repeated exactly without the budget. ``state.pt`` (best weights, fp16, with the config) is
    what travels back from such a machine: ``import_state`` exports and validates it here.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: Path | None = None,
        log_path: Path | None = None,
        device: str = "cpu",
        time_budget_s: float | None = None,
        export: bool = True,
    ) -> None:
        self.cfg = cfg
        self.out_dir = out_dir or VAR_DIR / cfg.variant
        self.log_path = log_path or RESULTS_DIR / f"train_{cfg.variant}.jsonl"
        self.checkpoint = self.out_dir / "checkpoint.pt"
        self.device = torch.device(device)
        self.time_budget_s = time_budget_s
        self.export = export
        self.mixed_precision = self.device.type == "cuda"

    def log(self, message: str) -> None:
        print(f"[train:{self.cfg.variant}] {message}", flush=True)

    def _record(self, row: dict[str, Any]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")

    def _save(
        self, model: STNEmbedder, keys: STNEmbedder, opt: torch.optim.Optimizer, queue: MemoryQueue, step: int
    ) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint.with_suffix(".tmp")
        state = {"config": asdict(self.cfg), "step": step, "model": model.state_dict(), "optimizer": opt.state_dict()}
        torch.save({**state, "keys": keys.state_dict(), "queue": queue.state()}, tmp)
        tmp.replace(self.checkpoint)

    def _truncate_log(self, step: int) -> None:
        """Drop log rows written after the checkpoint we resume from: they will be recomputed identically."""
        if not self.log_path.exists():
            return
        rows = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]
        # Validation rows at the resumed step are recomputed too (the stage switch or the final one).
        kept = [r for r in rows if int(r.get("step", 0)) < step or (int(r["step"]) == step and "validation" not in r)]
        self.log_path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.mixed_precision:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _data(
        self, with_views: bool = True
    ) -> tuple[list[PhotoRecord], list[PhotoRecord], ViewBank | None, NDArray[np.int64], Benchmark]:
        cfg = self.cfg
        manifest = load_photo_set()
        train_records, val_records = split_train_val(manifest, cfg.val_fraction, cfg.seed)
        self.log(f"{len(train_records)} train / {len(val_records)} validation originals (held-out never used)")
        bank = load_views(manifest, train_records, cfg, self.log) if with_views else None
        sources = sorted({r.source for r in train_records})
        families = np.array([sources.index(r.source) for r in train_records], dtype=np.int64)
        val_bench = build_benchmark(manifest, val_records, "validation", seed=cfg.seed)
        self.log(f"validation benchmark: {val_bench.meta}")
        return train_records, val_records, bank, families, val_bench

    def prepare_views(self) -> ViewBank:
        """Generate (or find) the cached views alone: runs that share a seed and view count then share them."""
        manifest = load_photo_set()
        train_records, _ = split_train_val(manifest, self.cfg.val_fraction, self.cfg.seed)
        return load_views(manifest, train_records, self.cfg, self.log)

    def _train_step(
        self,
        model: STNEmbedder,
        keys: STNEmbedder,
        opt: torch.optim.Optimizer,
        queue: MemoryQueue,
        batch: tuple[torch.Tensor, ...],
        use_queue: bool,
    ) -> dict[str, float]:
        cfg = self.cfg
        xa, xb, fa, fb, ids = batch
        with self._autocast():
            za, la, ta = model.encode(xa)
            zb, lb, tb = model.encode(xb)
            with torch.no_grad():
                ka = keys.encode(xa)[0]
                kb = keys.encode(xb)[0]
        # The loss in fp32: bf16 similarities are too coarse for a temperature of 0.07.
        za, zb = F.normalize(za.float(), dim=1), F.normalize(zb.float(), dim=1)
        ka, kb = F.normalize(ka.float(), dim=1), F.normalize(kb.float(), dim=1)
        la, lb, ta, tb = la.float(), lb.float(), ta.float(), tb.float()
        nce = info_nce(za, zb, ids, queue if use_queue else None, cfg.temperature, ka, kb)
        cls = F.binary_cross_entropy_with_logits(la, fa) + F.binary_cross_entropy_with_logits(lb, fb)
        reg = theta_regulariser(ta) + theta_regulariser(tb) if cfg.use_stn else torch.zeros((), device=za.device)
        loss = nce + cfg.cls_weight * cls + cfg.theta_weight * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            momentum_update(keys, model, cfg.momentum)
            queue.push(torch.cat([ka, kb]), torch.cat([ids, ids]))
            positive = (za * kb).sum(1).mean().item()
            scale = torch.sqrt(torch.abs(torch.linalg.det(ta[:, :, :2]))).mean().item()
        return {
            "loss": round(loss.item(), 5),
            "nce": round(nce.item(), 5),
            "cls": round(cls.item(), 5),
            "theta_reg": round(reg.item(), 6),
            "pos_sim": round(positive, 4),
            "theta_scale": round(scale, 4),
        }

    def _plan_steps(
        self, model: STNEmbedder, bank: ViewBank, families: NDArray[np.int64], val_bench: Benchmark
    ) -> dict[str, float]:
        """Stage lengths that fill the time budget, keeping the configured stage-1 : stage-2 ratio.

        A throwaway copy runs a few stage-2 steps (the costlier stage) and one validation; the warm-up steps
        (autotuning, allocator growth) are not counted."""
        assert self.time_budget_s is not None
        cfg = self.cfg
        probe = copy.deepcopy(model)
        probe_keys = copy.deepcopy(model)
        opt = _set_stage(probe, cfg, 2)
        queue = MemoryQueue(cfg.queue_size, cfg.embed_dim, self.device)
        times = []
        for i in range(8):
            t0 = time.monotonic()
            self._train_step(probe, probe_keys, opt, queue, sample_batch(bank, cfg, 10_000_000 + i, families), i > 1)
            times.append(time.monotonic() - t0)
        step_s = float(np.median(times[3:]))
        t0 = time.monotonic()
        validate(probe, val_bench, self.device)
        validate_s = time.monotonic() - t0
        del probe, probe_keys, opt, queue
        validations = 2 + (1 if cfg.validate_every else 0)
        usable = 0.92 * self.time_budget_s - validations * validate_s - 10.0
        per_step = step_s + (validate_s / cfg.validate_every if cfg.validate_every else 0.0)
        total = max(2, int(usable / per_step))
        stage1 = max(1, round(total * cfg.stage1_steps / max(1, cfg.total_steps)))
        self.cfg = dataclasses.replace(cfg, stage1_steps=stage1, stage2_steps=max(1, total - stage1))
        plan = {"step_seconds": round(step_s, 4), "validate_seconds": round(validate_s, 2), "total_steps": total}
        self.log(f"time budget {self.time_budget_s:.0f}s: {plan} -> {stage1} + {total - stage1} steps")
        return plan

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        started = time.monotonic()
        train_records, val_records, views, families, val_bench = self._data()
        assert views is not None
        bank = views
        bank = ViewBank(torch.from_numpy(bank.pixels).to(self.device), bank.flags, bank.ids)

        model = build_stn_embedder(use_stn=cfg.use_stn, embed_dim=cfg.embed_dim, input_size=cfg.input_size)
        model = model.eval().to(self.device)
        keys = copy.deepcopy(model).eval()
        for p in keys.parameters():
            p.requires_grad_(False)
        step = 0
        state: dict[str, Any] | None = None
        history: list[dict[str, Any]] = []
        plan: dict[str, float] = {}
        if self.checkpoint.exists():
            state = torch.load(self.checkpoint, map_location=self.device, weights_only=False)
            saved = dict(state["config"])
            if self.time_budget_s is not None:  # a budgeted run resumes with the step counts it planned
                self.cfg = cfg = dataclasses.replace(
                    cfg, stage1_steps=saved["stage1_steps"], stage2_steps=saved["stage2_steps"]
                )
            if saved != asdict(cfg):
                raise SystemExit(f"{self.checkpoint} was written with another config; remove it or pass --fresh")
            model.load_state_dict(state["model"])
            keys.load_state_dict(state["keys"])
            step = int(state["step"])
            self._truncate_log(step)
            self.log(f"resumed at step {step}/{cfg.total_steps}")
        else:
            if self.log_path.exists():
                self.log_path.unlink()  # a fresh run starts a fresh loss log
            if self.time_budget_s is not None:
                plan = self._plan_steps(model, bank, families, val_bench)
                cfg = self.cfg
                self._record(
                    {"step": 0, "plan": plan, "stage1_steps": cfg.stage1_steps, "stage2_steps": cfg.stage2_steps}
                )
            if cfg.pca_init:
                pca = init_projection_by_pca(model, bank, cfg.pca_views)
                keys.load_state_dict(model.state_dict())
                self.log(f"projection initialised by PCA: {pca}")
                self._record({"step": 0, **pca})
                history.append(self._validate(model, val_bench, 0, "after PCA initialisation"))
        queue = MemoryQueue(cfg.queue_size, cfg.embed_dim, self.device)
        if state is not None:
            queue.load(state["queue"])
        # A checkpoint taken at the stage boundary still holds stage-1 optimizer state; the loop switches.
        stage = 1 if step <= cfg.stage1_steps else 2
        opt = _set_stage(model, cfg, stage)
        if state is not None and step < cfg.total_steps:
            opt.load_state_dict(state["optimizer"])
        best: dict[str, Any] = {}

        def consider(row: dict[str, Any]) -> None:
            if cfg.validate_every and float(row["micro_ap"]) > float(best.get("micro_ap", -1.0)):
                best.update(micro_ap=row["micro_ap"], step=row["step"])
                best["state"] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

        loop_started = time.monotonic()
        while step < cfg.total_steps:
            if step == cfg.stage1_steps and stage == 1:
                history.append(self._validate(model, val_bench, step, "end of stage 1"))
                consider(history[-1])
                stage, opt = 2, _set_stage(model, cfg, 2)
                queue.reset()  # the trunk starts moving: stage-1 embeddings would be stale negatives
            in_stage = step if stage == 1 else step - cfg.stage1_steps
            stage_steps = cfg.stage1_steps if stage == 1 else cfg.stage2_steps
            factor = _lr_factor(in_stage, stage_steps, cfg.warmup_steps)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            t0 = time.monotonic()
            use_queue = in_stage >= cfg.queue_start and cfg.queue_size > 0
            stats = self._train_step(model, keys, opt, queue, sample_batch(bank, cfg, step, families), use_queue)
            step += 1
            row = {
                "step": step,
                "stage": stage,
                **stats,
                "lr_factor": round(factor, 4),
                "queue": int((queue.ids >= 0).sum()) if use_queue else 0,
                "seconds": round(time.monotonic() - t0, 3),
            }
            self._record(row)
            if step % 5 == 0 or step == cfg.total_steps:
                self.log(
                    f"step {step}/{cfg.total_steps} stage {stage} loss {row['loss']:.4f} nce {row['nce']:.4f} "
                    f"cls {row['cls']:.4f} θ-reg {row['theta_reg']:.4f} pos {row['pos_sim']:.3f} "
                    f"({row['seconds']:.2f}s/step)"
                )
            # The stage switch and the last step validate anyway.
            periodic = cfg.validate_every and step % cfg.validate_every == 0
            if periodic and step not in (cfg.stage1_steps, cfg.total_steps):
                history.append(self._validate(model, val_bench, step, "periodic"))
                consider(history[-1])
            if step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
                self._save(model, keys, opt, queue, step)
        selected = step
        if cfg.validate_every:
            history.append(self._validate(model, val_bench, step, "last step"))
            consider(history[-1])
            if best and int(best["step"]) != step:
                model.load_state_dict(best["state"])
                self.log(f"selected the state of step {best['step']} (validation µAP {best['micro_ap']:.4f})")
            selected = int(best["step"]) if best else step
        extra = {
            "selected_step": selected,
            "train_seconds_this_invocation": round(time.monotonic() - loop_started, 1),
            "wall_seconds": round(time.monotonic() - started, 1),
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "time_budget_plan": plan,
        }
        self._save_state(model.cpu(), history, extra)
        return self._finish(model, train_records, val_records, val_bench, history, extra)

    def _save_state(self, model: STNEmbedder, history: list[dict[str, Any]], extra: dict[str, Any]) -> Path:
        """The selected weights in fp16 (a few MB) with the config: enough to export the model anywhere."""
        weights = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
        path = self.out_dir / "state.pt"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"config": asdict(self.cfg), "model": weights, "history": history, **extra}, path)
        return path

    def import_state(self, path: Path) -> dict[str, Any]:
        """Export and validate weights trained elsewhere (``state.pt`` from a GPU machine) as if trained here."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.cfg = TrainConfig(**state["config"])
        self.out_dir = self.out_dir.parent / self.cfg.variant
        self.log(f"importing {path} (trained on {state.get('device', '?')}, step {state.get('selected_step')})")
        train_records, val_records, _, _, val_bench = self._data(with_views=False)
        model = build_stn_embedder(
            use_stn=self.cfg.use_stn, embed_dim=self.cfg.embed_dim, input_size=self.cfg.input_size
        )
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()})
        extra = {
            k: state[k]
            for k in ("selected_step", "train_seconds_this_invocation", "device", "time_budget_plan")
            if k in state
        }
        return self._finish(model.eval(), train_records, val_records, val_bench, list(state.get("history", [])), extra)

    def _finish(
        self,
        model: STNEmbedder,
        train_records: list[PhotoRecord],
        val_records: list[PhotoRecord],
        val_bench: Benchmark,
        history: list[dict[str, Any]],
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        cfg = self.cfg
        model = model.cpu()
        summary: dict[str, Any] = {
            "variant": cfg.variant,
            "config": asdict(cfg),
            "train_originals": len(train_records),
            "validation_originals": len(val_records),
            "validation_benchmark": val_bench.meta,
            "history": history,
            **extra,
        }
        if self.export:
            meta = {"variant": cfg.variant, "config": asdict(cfg)}
            exported = export_torchscript(model, self.out_dir / "model.pt", meta)
            self.log(f"exported {exported} ({exported.stat().st_size / 1e6:.1f} MB)")
            # Validate (and calibrate the threshold on) the exported file, fp16-rounded weights and all: that is
            # the network Triton serves, and its F1-optimal threshold can differ from the in-memory model's.
            final = self._validate(
                load_torchscript(exported)[0], val_bench, int(extra.get("selected_step", 0)), "final"
            )
            history.append(final)
            summary.update(validation=final, model_path=str(exported))
        else:
            summary["validation"] = next(
                (h for h in reversed(history) if h["step"] == extra.get("selected_step")), None
            )
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        return summary

    def _validate(
        self, model: Callable[[torch.Tensor], torch.Tensor], bench: Benchmark, step: int, label: str
    ) -> dict[str, Any]:
        t0 = time.monotonic()
        device = (
            self.device
            if isinstance(model, torch.nn.Module) and not isinstance(model, torch.jit.ScriptModule)
            else "cpu"
        )
        metrics = validate(model, bench, device)
        row = {"step": step, "validation": label, **{k: round(v, 5) for k, v in metrics.items()}}
        self._record(row)
        self.log(
            f"validation ({label}): µAP {metrics['micro_ap']:.4f} R@P90 {metrics['recall_at_p90']:.4f} "
            f"F1 {metrics['f1']:.4f} @ {metrics['threshold']:.3f} ({time.monotonic() - t0:.0f}s)"
        )
        return row


def sweep_temperature(
    base: TrainConfig, temperatures: Iterable[float], steps: int, out: Path | None = None
) -> dict[str, Any]:
    """Short frozen-trunk runs per temperature, scored by validation µAP: the temperature is the knob that
    matters most for InfoNCE and is cheap to compare with the trunk frozen."""
    results = []
    for t in temperatures:
        cfg = dataclasses.replace(base, temperature=t, stage1_steps=steps, stage2_steps=0, variant="no_stn")
        run_dir = VAR_DIR / "sweep" / f"t{t:g}"
        if (run_dir / "checkpoint.pt").exists():
            (run_dir / "checkpoint.pt").unlink()
        summary = Trainer(cfg, run_dir, run_dir / "loss.jsonl").run()
        results.append({"temperature": t, "validation": summary["validation"]})
    best = max(results, key=lambda r: float(r["validation"]["micro_ap"]))
    report = {"steps": steps, "results": results, "best_temperature": best["temperature"]}
    path = out or RESULTS_DIR / "temperature_sweep.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=True))
    return report


def default_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))
