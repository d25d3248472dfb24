"""``sieve train``: run (or resume) a training run, optionally sweep the temperature and ship to model_repo/."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from services.common.config import REPO_ROOT

MODEL_REPO = REPO_ROOT / "model_repo" / "sieve_embedder"
# TrainConfig fields settable from the command line (--stage1-steps, --hard-negative-fraction, ...).
TUNABLE: dict[str, type] = {
    "stage1_steps": int,
    "stage2_steps": int,
    "batch_pairs": int,
    "views": int,
    "input_size": int,
    "embed_dim": int,
    "temperature": float,
    "trainable_from": int,
    "lr_head": float,
    "lr_trunk": float,
    "lr_head_stage2": float,
    "lr_loc": float,
    "momentum": float,
    "queue_size": int,
    "queue_start": int,
    "warmup_steps": int,
    "hard_negative_fraction": float,
    "validate_every": int,
    "checkpoint_every": int,
    "theta_weight": float,
    "threads": int,
}


def _cmd_train(args: argparse.Namespace) -> int:
    from services.trainer.train import VAR_DIR, TrainConfig, Trainer, sweep_temperature

    if args.import_state:
        trainer = Trainer(TrainConfig(variant=args.variant), VAR_DIR / args.variant)
        summary = trainer.import_state(Path(args.import_state))
        print(json.dumps({k: summary[k] for k in ("variant", "validation", "model_path")}, indent=2))
        if args.ship:
            ship(Path(summary["model_path"]), summary, args.ship_version, Path(args.loader) if args.loader else None)
        return 0
    overrides: dict[str, Any] = {"variant": args.variant, "seed": args.seed}
    for name in TUNABLE:
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    cfg = dataclasses.replace(TrainConfig(), **overrides)
    if args.sweep_temperature:
        temps = [float(t) for t in args.sweep_temperature.split(",")]
        report = sweep_temperature(cfg, temps, args.sweep_steps)
        print(json.dumps({"best_temperature": report["best_temperature"]}))
        if args.sweep_only:
            return 0
        cfg = dataclasses.replace(cfg, temperature=float(report["best_temperature"]))
    out_dir = Path(args.out_dir) if args.out_dir else VAR_DIR / cfg.variant
    if args.views_only:
        Trainer(cfg, out_dir).prepare_views()
        return 0
    if args.fresh and (out_dir / "checkpoint.pt").exists():
        (out_dir / "checkpoint.pt").unlink()
    log_path = Path(args.log) if args.log else None
    trainer = Trainer(
        cfg, out_dir, log_path, device=args.device, time_budget_s=args.time_budget, export=not args.no_export
    )
    summary = trainer.run()
    if args.no_export:
        print(json.dumps({k: summary[k] for k in ("variant", "validation", "selected_step")}, indent=2))
        return 0
    print(json.dumps({k: summary[k] for k in ("variant", "validation", "model_path")}, indent=2))
    if args.ship:
        ship(Path(summary["model_path"]), summary, args.ship_version, Path(args.loader) if args.loader else None)
    return 0


def _loader_source(version: int) -> Path:
    """The Triton model.py to ship with a new version: the version's own if present, else the newest
    version that already serves a TorchScript ``model.pt`` (the loader does not change between versions)."""
    own = MODEL_REPO / str(version) / "model.py"
    if own.exists():
        return own
    candidates = sorted(
        (int(p.name) for p in MODEL_REPO.iterdir() if p.name.isdigit() and (p / "model.pt").exists()), reverse=True
    )
    if not candidates:
        raise SystemExit(f"no TorchScript loader to copy: put a model.py into {own.parent} first")
    return MODEL_REPO / str(candidates[0]) / "model.py"


def ship(model_path: Path, summary: dict[str, Any], version: int, loader: Path | None = None) -> Path:
    """Export into model_repo/sieve_embedder/<version>/ with its model card, without a half-written folder.

    Triton (and every running stack) scans model_repo/: a version folder whose model.py exists before its
    model.pt would fail to load, so everything is staged under var/ and moved in with renames.
    """
    from services.common.photos.build import load_photo_set
    from services.trainer.train import RESULTS_DIR, VAR_DIR

    target = MODEL_REPO / str(version)
    staging = VAR_DIR / f"ship-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copy2(loader or _loader_source(version), staging / "model.py")
    shutil.copy2(model_path, staging / "model.pt")
    artifacts = ["model.pt"]
    try:
        from services.trainer.export import export_onnx

        export_onnx(staging / "model.pt", staging / "model.onnx")
        artifacts.append("model.onnx")
    except ImportError as exc:  # the onnx package is only needed here, at export time
        print(f"no model.onnx ({exc}); Triton will serve model.pt")
    manifest = load_photo_set()
    card_path = target / "model_card.json"
    previous: dict[str, Any] = json.loads(card_path.read_text()) if card_path.exists() else {}
    # Keep only what ``sieve eval --update-card`` wrote; everything else describes this export.
    card = {k: v for k, v in previous.items() if k in ("heldout_metrics", "dimension_tradeoff", "serving_benchmark")}
    cfg = summary["config"]
    card.update(
        {
            "model": "sieve_embedder",
            "version": version,
            "architecture": "STN (bounded affine, identity init) -> MobileNetV2 (ImageNet) -> GeM -> "
            f"linear {cfg['embed_dim']}-d L2 embedding + multi-label flag head",
            "artifacts": {
                name: {
                    "format": "TorchScript" if name.endswith(".pt") else "ONNX opset 20 (served by onnxruntime)",
                    "weights": "fp16 storage, fp32 compute",
                    "bytes": (staging / name).stat().st_size,
                }
                for name in artifacts
            },
            "input": "IMAGE uint8 [N,256,256,3] RGB, decoded by services.common.imaging.decode_image",
            "output": f"EMBEDDING fp32 [N,{cfg['embed_dim']}] L2-normalised; cosine similarity = inner product",
            "seed": cfg["seed"],
            "hyper_parameters": cfg,
            "data": {
                "source": "services.common.photos (real photos shipped in Debian packages and scikit-image)",
                "packages": manifest.packages,
                "counts": manifest.counts(),
                "splits": {
                    "train_originals_used": summary["train_originals"],
                    "validation_originals_carved_from_train_by_group": summary["validation_originals"],
                    "heldout_originals_never_trained_on": len(manifest.split("heldout")),
                },
                "augmented_views_per_original": cfg["views"],
            },
            "validation": summary["validation"],
            "duplicate_threshold": round(float(summary["validation"]["threshold"]), 4),
            "duplicate_threshold_note": "F1-optimal cosine similarity on the validation benchmark (train split)",
            "training_log": str((RESULTS_DIR / f"train_{summary['variant']}.jsonl").relative_to(REPO_ROOT)),
            "training_run": {
                k: summary[k]
                for k in ("device", "selected_step", "train_seconds_this_invocation", "time_budget_plan")
                if k in summary
            },
        }
    )
    (staging / "model_card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    if not target.exists():
        staging.rename(target)
    else:
        stale = target / "model.onnx"
        if "model.onnx" not in artifacts and stale.exists():
            stale.unlink()  # never serve an ONNX file exported from an older model.pt
        for name in (*artifacts, "model_card.json", "model.py"):
            (staging / name).replace(target / name)
        shutil.rmtree(staging, ignore_errors=True)
    print(f"shipped {target}")
    return target


def add_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train", help="train (or resume) the STN embedder on the photo set; --ship exports it")
    p.add_argument("--variant", choices=("stn", "no_stn"), default="stn", help="no_stn: the ablation")
    p.add_argument("--seed", type=int, default=7)
    for name, kind in TUNABLE.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=f"TrainConfig.{name}")
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine (bf16 autocast)")
    p.add_argument(
        "--time-budget", type=float, default=None, help="seconds: size both stages from a measured step time"
    )
    p.add_argument("--no-export", action="store_true", help="keep state.pt only (export later with --import-state)")
    p.add_argument("--import-state", default=None, help="export and validate a state.pt trained elsewhere")
    p.add_argument("--views-only", action="store_true", help="generate the cached augmented views and stop")
    p.add_argument("--out-dir", default=None, help="run folder (default var/trainer/<variant>)")
    p.add_argument("--log", default=None, help="loss log (default bench/results/train_<variant>.jsonl)")
    p.add_argument("--sweep-temperature", default="", help="comma list: pick the best on validation µAP first")
    p.add_argument("--sweep-steps", type=int, default=40)
    p.add_argument("--sweep-only", action="store_true")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--ship", action="store_true", help="copy the result to model_repo/sieve_embedder/<version>/")
    p.add_argument("--ship-version", type=int, default=2)
    p.add_argument("--loader", default=None, help="Triton model.py to ship (default: the newest TorchScript one)")
    p.set_defaults(func=_cmd_train)


def main(argv: list[str] | None = None) -> int:
    """``python -m services.trainer.cli train ...``: training needs only torch, numpy, Pillow and pydantic, so a
    GPU machine without the serving stack's packages runs it this way."""
    parser = argparse.ArgumentParser(prog="sieve")
    add_subcommands(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
