"""Sieve's benchmark harness (issue 6): one module per stage, each with ``run(quick) -> dict`` in a common format.

Stages owned here: ``stage_decode`` (1), ``stage_model`` (2), ``stage_faiss`` (4) and ``peers``; the shared
timing helpers, result format and machine description are in ``bench.common``. Every stage writes
``bench/results/<stage>.json`` when run as ``python -m bench.<module>``.
"""
