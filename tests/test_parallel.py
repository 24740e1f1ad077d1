"""calib.parallel: which stages run, in which order, how many at once, and what a failure does.

The scheduler is tested on small made-up pipelines whose "stages" are short Python processes
that log when they start and end; the smoke pipeline test runs the real one end to end.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from calib import parallel
from calib.parallel import (
    DEFAULT_COST,
    Launch,
    critical_path_priority,
    downstream_closure,
    run_parallel,
    schedule_order,
    stage_cost,
    stage_environment,
)

# a -> b -> c (c depends on b, b on a), d alone, e depends on a and d.
PIPELINE = {"a": set(), "b": {"a"}, "c": {"b"}, "d": set(), "e": {"a", "d"}}


def test_downstream_closure_adds_every_dependent():
    assert downstream_closure(PIPELINE, ["b"]) == {"b", "c"}
    assert downstream_closure(PIPELINE, ["a"]) == {"a", "b", "c", "e"}
    assert downstream_closure(PIPELINE, ["d", "c"]) == {"c", "d", "e"}
    assert downstream_closure(PIPELINE, []) == set()


def test_critical_path_priority_sums_the_costliest_chain():
    cost = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 10.0, "e": 0.5}.__getitem__
    priority = critical_path_priority(PIPELINE, set(PIPELINE), cost)
    assert priority == {"c": 3.0, "b": 5.0, "a": 6.0, "e": 0.5, "d": 10.5}
    # Only chains inside the run count: without c, b's chain is b alone.
    assert critical_path_priority(PIPELINE, {"a", "b"}, cost) == {"a": 3.0, "b": 2.0}


def _random_pipeline(rng: random.Random, n: int) -> dict[str, set[str]]:
    names = [f"s{i}" for i in range(n)]
    return {name: {up for up in names[:i] if rng.random() < 0.2}
            for i, name in enumerate(names)}


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_schedule_order_respects_dependencies(seed, jobs):
    rng = random.Random(seed)
    pipeline = _random_pipeline(rng, 25)
    stages = downstream_closure(pipeline, rng.sample(sorted(pipeline), 4))
    costs = {name: rng.uniform(0.1, 5.0) for name in pipeline}
    order = schedule_order(pipeline, stages, jobs, costs.__getitem__)
    assert sorted(order) == sorted(stages)
    position = {name: i for i, name in enumerate(order)}
    for name in stages:
        for up in pipeline[name] & stages:
            assert position[up] < position[name], (up, name)


def test_schedule_order_starts_the_longest_chain_first():
    pipeline = {"short": set(), "long1": set(), "long2": {"long1"}, "long3": {"long2"}}
    order = schedule_order(pipeline, set(pipeline), 1, lambda name: 1.0)
    assert order[0] == "long1"
    two = schedule_order(pipeline, set(pipeline), 2, lambda name: 1.0)
    assert set(two[:2]) == {"long1", "short"}


def test_a_cycle_is_reported():
    with pytest.raises(ValueError, match="wait on each other"):
        schedule_order({"x": {"y"}, "y": {"x"}}, {"x", "y"}, 2, lambda name: 1.0)


def test_stage_cost_by_name_then_kind():
    assert stage_cost("defend@resnet-caat") == parallel.STAGE_COST_BY_NAME["defend@*-caat"]
    assert stage_cost("defend@resnet-none") == parallel.STAGE_COST["defend"]
    assert stage_cost("train@resnet") == parallel.STAGE_COST["train"]
    assert stage_cost("report") == DEFAULT_COST


def test_stage_environment_splits_the_cores(monkeypatch):
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    env = stage_environment(2, base={"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == "2" and env["MKL_NUM_THREADS"] == "2"
    assert stage_environment(8, base={})["OMP_NUM_THREADS"] == "1"
    assert stage_environment(2, base={"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"


def _fake_stages(tmp_path: Path, *, fail: set[str] = frozenset(), seconds: float = 0.3
                 ) -> tuple[Launch, Path]:
    """Stages that append 'start NAME T' / 'end NAME T' to a journal (and NAME in ``fail``
    exits 3 after printing a message)."""
    journal = tmp_path / "journal.txt"
    script = (
        "import sys, time\n"
        "name, journal, seconds, fail = sys.argv[1], sys.argv[2], float(sys.argv[3]), "
        "sys.argv[4] == '1'\n"
        "open(journal, 'a').write(f'start {name} {time.monotonic()}\\n')\n"
        "time.sleep(seconds)\n"
        "if fail:\n"
        "    print(f'{name} broke on purpose')\n"
        "    sys.exit(3)\n"
        "open(journal, 'a').write(f'end {name} {time.monotonic()}\\n')\n")

    def command(name: str) -> list[str]:
        return [sys.executable, "-c", script, name, str(journal), str(seconds),
                "1" if name in fail else "0"]

    return Launch(command=command), journal


def _events(journal: Path) -> list[tuple[str, str, float]]:
    rows = [line.split() for line in journal.read_text().splitlines()]
    return sorted(((kind, name, float(t)) for kind, name, t in rows), key=lambda r: r[2])


@pytest.mark.parametrize("jobs", [1, 2])
def test_run_parallel_runs_each_stage_once_after_its_dependencies(tmp_path, jobs):
    launch, journal = _fake_stages(tmp_path)
    lines: list[str] = []
    failed = run_parallel(PIPELINE, set(PIPELINE), jobs=jobs, launch=launch,
                          log_dir=tmp_path / "logs", echo=lines.append, poll_seconds=0.02)
    assert failed == []
    events = _events(journal)
    started = {name: t for kind, name, t in events if kind == "start"}
    ended = {name: t for kind, name, t in events if kind == "end"}
    assert sorted(started) == sorted(ended) == sorted(PIPELINE)
    for name, upstream in PIPELINE.items():
        for up in upstream:
            assert ended[up] <= started[name], (up, name)
    # Never more than `jobs` stages at once, and with two jobs some do overlap.
    running, most = 0, 0
    for kind, _, _ in events:
        running += 1 if kind == "start" else -1
        most = max(most, running)
    assert most == jobs
    assert sum(line.split()[1] == "done" for line in lines) == len(PIPELINE)
    assert sorted(p.stem for p in (tmp_path / "logs").glob("*.log")) == sorted(PIPELINE)


def test_after_a_failure_nothing_new_starts(tmp_path):
    launch, journal = _fake_stages(tmp_path, fail={"a"})
    lines: list[str] = []
    failed = run_parallel(PIPELINE, set(PIPELINE), jobs=1, launch=launch,
                          log_dir=tmp_path / "logs", echo=lines.append, poll_seconds=0.02)
    assert failed == ["a"]
    started = [name for kind, name, _ in _events(journal) if kind == "start"]
    assert started == ["a"]  # a has the longest chain, so it starts first, alone
    text = "\n".join(lines)
    assert "FAILED a" in text and "a broke on purpose" in text
    assert "not started after the failure: b, c, d, e" in text


def test_bad_arguments_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        run_parallel(PIPELINE, {"a"}, jobs=0, log_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown stages \['zz'\]"):
        run_parallel(PIPELINE, {"a", "zz"}, jobs=1, log_dir=tmp_path)
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            parallel.main(["--jobs", bad])
