"""The moderator's worker processes: results cross the boundary intact, and a dead worker loses nothing."""

import os

import pytest

from services.common.errors import BadInput
from services.common.schemas import ErrorKind
from services.moderator.stages.workers import Workers


def _pid_and(value: int) -> tuple[int, int]:
    return os.getpid(), value * 2


def _refuse(detail: str) -> None:
    raise BadInput(ErrorKind.CORRUPT_IMAGE, detail)


def _die_outside(parent: int) -> str:
    if os.getpid() != parent:
        os._exit(3)  # a worker killed mid-call (the OOM killer, a segfault in a decoder)
    return "done in line"


@pytest.fixture
def workers() -> Workers:
    pool = Workers(1)
    yield pool
    pool.close()


def test_calls_run_in_another_process_and_map_keeps_order(workers: Workers) -> None:
    results = workers.map(_pid_and, [(n,) for n in range(6)])
    assert [v for _, v in results] == [0, 2, 4, 6, 8, 10]
    assert {pid for pid, _ in results} != {os.getpid()}


def test_bad_input_keeps_its_kind_across_the_boundary(workers: Workers) -> None:
    with pytest.raises(BadInput) as raised:
        workers.call(_refuse, "truncated")
    assert raised.value.kind is ErrorKind.CORRUPT_IMAGE and raised.value.detail == "truncated"


def test_a_dead_worker_costs_one_call_in_line_and_the_pool_comes_back(workers: Workers) -> None:
    assert workers.call(_die_outside, os.getpid()) == "done in line"
    pid, doubled = workers.call(_pid_and, 21)
    assert doubled == 42 and pid != os.getpid()


def test_no_processes_runs_in_line() -> None:
    pool = Workers(0)
    assert pool.call(_pid_and, 1) == (os.getpid(), 2)
