"""Reproduce the pipeline with several stages at once (``make reproduce JOBS=2``).

``dvc repro`` runs one stage after another. DVC does release its repository lock while a
stage's command runs, and guards each stage's dependencies and outputs with read/write locks,
so separate ``dvc --wait-for-lock repro --single-item STAGE`` processes may run stages that do
not depend on one another. This module is that scheduler::

    python -m calib.parallel                 # JOBS = auto (see default_jobs)
    python -m calib.parallel --jobs 2
    python -m calib.parallel --dry           # the stages it would run, in the order it would

1. It asks DVC which stages changed (``dvc status``) and adds every stage downstream of them:
   the set ``dvc repro`` would consider.
2. It starts a stage once every stage it depends on in that set has finished, up to ``jobs``
   at once, longest remaining chain first (each stage weighted by a rough cost of its kind,
   :data:`STAGE_COST`), so the chains that gate the end of the run start early.
3. DVC still decides per stage whether to run it: a stage whose inputs came out unchanged is
   skipped as in ``dvc repro``. A final plain ``dvc repro`` confirms nothing is left.

Threads. On a CPU, two stages at once on two cores, one thread each, answer more images per
second than one stage with two threads (small batches of 28-px images do not keep a second
thread busy; README "Time of the whole pipeline" has the numbers). Every stage therefore gets
``OMP_NUM_THREADS = cores // jobs`` unless the caller set it. Forward passes and input
gradients (what the attacks use) come out bit-identical at one or two threads; weight gradients
do not (their reductions split by thread), so a model trained with another thread count differs
in its last bits. Runs with the same ``jobs`` on the same machine give identical results.

Each stage's output goes to ``.dvc/tmp/parallel/<stage>.log``; the log's end is printed when a
stage fails, and then no new stage starts (the running ones finish) and the exit status is 1.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from calib.timings import format_seconds

#: Rough minutes per stage of each kind in the default profile on a 2-core CPU (README "Time of
#: the whole pipeline"); only their ratios matter, for the order in which ready stages start.
STAGE_COST: dict[str, float] = {
    "train": 4.0, "train_seeds": 6.0, "attack": 3.0, "defend": 1.5, "sweep": 0.7,
    "budget": 0.3, "claims": 1.5, "detection": 0.6, "seeds": 0.8,
}
#: Stages much costlier than their kind's other items (adversarial training, the larger ViT).
STAGE_COST_BY_NAME: dict[str, float] = {
    "defend@*-caat": 8.0, "defend@*-pgd_at": 5.0, "train@vit": 6.0, "attack@vit": 6.0,
}
#: Cost of a stage whose kind is not listed (plots, tables, reports).
DEFAULT_COST = 0.2
#: Where each stage's output is written.
LOG_DIR = Path(".dvc/tmp/parallel")


def stage_kind(name: str) -> str:
    """``"defend"`` for ``"defend@resnet-none"``: the dvc.yaml stage a foreach item belongs to."""
    return name.split("@", 1)[0]


def stage_cost(name: str) -> float:
    """Rough relative cost of a stage: :data:`STAGE_COST_BY_NAME`, else its kind's."""
    for pattern, cost in STAGE_COST_BY_NAME.items():
        if fnmatch.fnmatchcase(name, pattern):
            return cost
    return STAGE_COST.get(stage_kind(name), DEFAULT_COST)


def downstream_closure(depends_on: Mapping[str, set[str]], changed: Iterable[str]) -> set[str]:
    """``changed`` and every stage that depends on one of them, directly or not.

    Args:
        depends_on: stage -> the stages it depends on (every stage of the pipeline is a key).
        changed: stages whose own inputs changed.
    """
    dependents: dict[str, set[str]] = {name: set() for name in depends_on}
    for name, upstream in depends_on.items():
        for up in upstream:
            dependents[up].add(name)
    todo, seen = list(changed), set(changed)
    while todo:
        for child in dependents[todo.pop()]:
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def critical_path_priority(depends_on: Mapping[str, set[str]], stages: set[str],
                           cost: Callable[[str], float] = stage_cost) -> dict[str, float]:
    """Per stage, its cost plus the costliest chain of ``stages`` that waits on it.

    Starting the stage with the largest value first is the classic list-scheduling rule that
    keeps the longest chain (here: training, then attacks, then the analyses) from finishing
    last on an otherwise idle machine.
    """
    dependents: dict[str, set[str]] = {name: set() for name in stages}
    for name in stages:
        for up in depends_on[name] & stages:
            dependents[up].add(name)
    priority: dict[str, float] = {}
    visiting: set[str] = set()

    def visit(name: str) -> float:
        if name not in priority:
            if name in visiting:
                raise ValueError(f"stages {sorted(visiting)} wait on each other (a cycle)")
            visiting.add(name)
            priority[name] = cost(name) + max((visit(d) for d in dependents[name]), default=0.0)
            visiting.discard(name)
        return priority[name]

    for name in stages:
        visit(name)
    return priority


def schedule_order(depends_on: Mapping[str, set[str]], stages: set[str], jobs: int,
                   cost: Callable[[str], float] = stage_cost) -> list[str]:
    """The order in which :func:`run_parallel` would start ``stages`` if each took its cost.

    Used by ``--dry`` and by the tests; a dependency always precedes its dependents.
    """
    clock = 0.0
    running: dict[str, float] = {}
    order: list[str] = []
    priority = critical_path_priority(depends_on, stages, cost)
    pending = set(stages)
    while pending or running:
        for name in _ready(depends_on, pending, running, priority)[: jobs - len(running)]:
            pending.discard(name)
            running[name] = clock + cost(name)
            order.append(name)
        name = min(running, key=lambda n: (running[n], n))
        clock = running.pop(name)
    return order


def _ready(depends_on: Mapping[str, set[str]], pending: set[str], running: Iterable[str],
           priority: Mapping[str, float]) -> list[str]:
    """Pending stages none of whose upstream stages is pending or running, most urgent first."""
    blocked = pending | set(running)
    ready = [name for name in pending if not depends_on[name] & blocked]
    return sorted(ready, key=lambda name: (-priority[name], name))


@dataclass
class Launch:
    """How a stage is started: by default ``dvc --wait-for-lock repro --single-item NAME``."""

    command: Callable[[str], list[str]] = field(
        default=lambda name: ["dvc", "--wait-for-lock", "repro", "--single-item", name])
    env: Mapping[str, str] | None = None


def run_parallel(depends_on: Mapping[str, set[str]], stages: set[str], *, jobs: int,
                 launch: Launch | None = None, log_dir: Path = LOG_DIR,
                 echo: Callable[[str], None] = print, poll_seconds: float = 0.5) -> list[str]:
    """Run ``stages`` with at most ``jobs`` at once, each after the stages it depends on.

    Returns:
        The stages that failed (empty when all succeeded). After a failure no new stage starts;
        those already running finish.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    unknown = sorted(set(stages) - set(depends_on))
    if unknown:
        raise ValueError(f"unknown stages {unknown}")
    launch = launch or Launch()
    log_dir.mkdir(parents=True, exist_ok=True)
    priority = critical_path_priority(depends_on, set(stages))
    pending, done, failed = set(stages), set(), []
    running: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    total, start = len(stages), time.monotonic()
    try:
        while pending or running:
            if not failed:
                for name in _ready(depends_on, pending, running, priority)[: jobs - len(running)]:
                    pending.discard(name)
                    log = (log_dir / f"{name}.log").open("wb")
                    proc = subprocess.Popen(launch.command(name), stdout=log,
                                            stderr=subprocess.STDOUT, env=launch.env,
                                            start_new_session=True)
                    log.close()
                    running[name] = (proc, time.monotonic())
                    echo(f"[{_clock(start)}] start {name}")
            elif not running:
                break
            time.sleep(poll_seconds)
            for name, (proc, began) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                took = format_seconds(time.monotonic() - began)
                if proc.returncode == 0:
                    done.add(name)
                    echo(f"[{_clock(start)}] done  {name} in {took} ({len(done)}/{total})")
                else:
                    failed.append(name)
                    echo(f"[{_clock(start)}] FAILED {name} after {took} (exit "
                         f"{proc.returncode}); its log, {log_dir / (name + '.log')}, ends:")
                    echo(_tail(log_dir / f"{name}.log"))
    except KeyboardInterrupt:
        for proc, _ in running.values():
            os.killpg(proc.pid, signal.SIGINT)
        for proc, _ in running.values():
            proc.wait()
        raise
    if failed and pending:
        echo(f"not started after the failure: {', '.join(sorted(pending))}")
    return failed


def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join("    " + line for line in text[-lines:])


def _clock(start: float) -> str:
    return format_seconds(time.monotonic() - start)


def pipeline_graph(repo_root: str | Path = ".") -> tuple[dict[str, set[str]], set[str]]:
    """(stage -> the stages it depends on, the stages ``dvc status`` reports changed)."""
    from dvc.repo import Repo

    with Repo(str(repo_root)) as repo:
        graph = repo.index.graph  # an edge a -> b: stage a depends on stage b
        depends_on = {stage.addressing: set() for stage in graph.nodes}
        for a, b in graph.edges:
            depends_on[a.addressing].add(b.addressing)
        changed = set(repo.status())
    return depends_on, changed


def default_jobs() -> int:
    """Stages at once: 1 with a CUDA GPU (the stages share it), else the cores, at most 4."""
    import torch

    if torch.cuda.is_available():
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0))))


def stage_environment(jobs: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with ``cores // jobs`` threads per stage, unless set."""
    env = dict(os.environ if base is None else base)
    threads = str(max(1, len(os.sched_getaffinity(0)) // jobs))
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(key, threads)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calib.parallel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", default="auto",
                        help="stages at once: a number, or 'auto' (default: 1 with a CUDA "
                             "GPU, else the number of cores, at most 4)")
    parser.add_argument("--dry", action="store_true",
                        help="print the stages that would run, in starting order, and exit")
    args = parser.parse_args(argv)
    if args.jobs == "auto":
        jobs = default_jobs()
    else:
        try:
            jobs = int(args.jobs)
        except ValueError:
            parser.error(f"--jobs must be a number or 'auto', got {args.jobs!r}")
        if jobs < 1:
            parser.error(f"--jobs must be >= 1, got {jobs}")
    if jobs == 1 and not args.dry:  # one stage at a time: DVC's own loop, threads untouched
        return subprocess.run(["dvc", "repro"]).returncode
    depends_on, changed = pipeline_graph()
    stages = downstream_closure(depends_on, changed)
    if args.dry:
        for name in schedule_order(depends_on, stages, jobs):
            print(name)
        return 0
    if not stages:
        print("every stage is up to date")
        return 0
    env = stage_environment(jobs)
    print(f"{len(stages)} of {len(depends_on)} stages to check, {jobs} at once, "
          f"{env['OMP_NUM_THREADS']} thread(s) each; logs in {LOG_DIR}/")
    start = time.monotonic()
    failed = run_parallel(depends_on, stages, jobs=jobs, launch=Launch(env=env))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    # Whatever the scheduler did not cover (nothing, normally) runs the usual way; DVC's
    # "didn't change, skipping" line per stage is left out of the summary.
    final = subprocess.run(["dvc", "repro"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    shown = [line for line in final.stdout.splitlines() if "didn't change, skipping" not in line]
    print("\n".join(shown))
    if final.returncode != 0:
        return final.returncode
    print(f"all {len(stages)} stages done in {_clock(start)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
