"""One setting off, then on: the e2e stage twice on one stack, in one run, and the throughput ratio. A setting may be
several variables that one feature spans (the second pass: keypoints, and the uploads' regions)."""

from __future__ import annotations

import os
from typing import Any

from bench import stage_e2e
from services.common.stack import LocalStack


def saturation(result: dict[str, Any]) -> dict[str, Any]:
    return next(row for row in result["rows"] if row["case"] == "saturation")


Variables = str | tuple[str, ...]


def off_then_on(variables: Variables, labels: tuple[str, str], quick: bool) -> dict[str, Any]:
    """``variables`` set to false, then true; the rest of the environment as it is."""
    return one_then_other(variables, {labels[0]: "false", labels[1]: "true"}, quick)


def one_then_other(variables: Variables, cases: dict[str, str], quick: bool) -> dict[str, Any]:
    """The e2e stage once per value of ``variables`` (first case first), on one stack; ratio: second over first."""
    names = (variables,) if isinstance(variables, str) else variables
    labels = list(cases)
    stack = LocalStack()
    stack.start()
    runs: dict[str, dict[str, Any]] = {}
    previous = {name: os.environ.get(name) for name in names}
    try:
        for label, value in cases.items():
            os.environ.update({name: value for name in names})
            runs[label] = stage_e2e.run(quick=quick, stack=stack)
    finally:
        for name, was in previous.items():
            if was is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = was
        stack.stop()
    off, on = saturation(runs[labels[0]]), saturation(runs[labels[1]])
    ratio = on["images_per_s"] / off["images_per_s"] if off["images_per_s"] else 0.0
    return {
        "variables": list(names),
        "cases": cases,
        "saturation_uploads_per_s": {"without": off["images_per_s"], "with": on["images_per_s"]},
        "throughput_ratio": round(ratio, 3),
        "runs": runs,
    }


def cost_of(
    stage: str, variables: Variables, labels: tuple[str, str], goal_ratio: float, quick: bool
) -> dict[str, Any]:
    """A feature's end-to-end cost as a result: throughput with it on over without, against ``goal_ratio``."""
    compared = off_then_on(variables, labels, quick)
    ratio = compared["throughput_ratio"]
    return {
        "stage": stage,
        "quick": quick,
        "variables": compared["variables"],
        "saturation_uploads_per_s": compared["saturation_uploads_per_s"],
        "throughput_ratio": ratio,
        "goal_ratio": goal_ratio,
        "meets_goal": ratio >= goal_ratio,
        "runs": compared["runs"],
    }
