"""``make run``: the whole system on a local stack, fed real photos with planted near-duplicates."""

from services.demo.run import run_demo

__all__ = ["run_demo"]
