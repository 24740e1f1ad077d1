"""Run a parameter grid on many machines: one Slurm job per experiment, through submitit.

DVC runs the stages of one experiment in order, and its experiment queue runs experiments on
one machine. Beyond one machine an existing scheduler takes over; this module only hands it the
work (it is no executor of its own)::

    python -m calib.launch --executor slurm -S 'attack.eps=0.02,0.05' -S 'seed=0,1'

expands the ``-S`` values (DVC's override syntax: ``key=v1,v2`` is a sweep) into their
cartesian product, one experiment per combination, named after what varies
(``eps0.02-seed0``). Before anything is submitted it checks everything it can: the executor, every
combination applied to a copy of params.yaml (the committed one, which the jobs will see)
and validated by :mod:`calib.config` (unknown keys get "did you mean", bad values the allowed
range), the experiment names, and, for Slurm, that the cluster answers and the partition
exists. Any problem stops it with one line per problem and exit status 2: a grid is submitted
whole or not at all.

Each job (:func:`run_experiment`) runs in its own clone: ``git clone`` of the submitting
repository at the validated commit, the DVC cache pointed at the submitting repository's
cache (``--cache``; shared, ``cache.shared group``) or a DVC remote (``--remote``), then
``dvc exp run -n <name> -S ...`` and ``dvc exp push origin <name>``: the experiment lands in
the submitting repository's ``refs/exps``, where ``dvc exp show`` lists it (no
``dvc exp pull`` needed). ``--executor local`` runs the same jobs on this machine through
submitit's ``LocalExecutor``, at most ``--jobs`` at a time, each with one GPU of its own
(``CUDA_VISIBLE_DEVICES``) where there are GPUs; on Slurm, ``--gpus-per-job`` makes Slurm
set it.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import getpass
import hashlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from calib.config import ConfigError, check_params

__all__ = [
    "EXECUTORS",
    "Experiment",
    "JobSpec",
    "LaunchError",
    "apply_overrides",
    "check_grid",
    "detect_gpus",
    "expand_grid",
    "experiment_name",
    "gpu_for",
    "job_commands",
    "main",
    "plan",
    "run_experiment",
]

#: Where the jobs run: a Slurm cluster, or this machine (submitit's LocalExecutor).
EXECUTORS: tuple[str, ...] = ("slurm", "local")
#: Longest experiment name before it is shortened with a hash.
MAX_NAME = 80
#: A Slurm job that left the queue without a result is failed after this long (shared
#: file systems may show the result file late).
RESULT_GRACE_S = 15.0
#: Under the submitting repository: submitit's logs and the jobs' clones (.dvc/tmp is
#: ignored by git and DVC).
LAUNCH_DIR = Path(".dvc") / "tmp" / "launch"


class LaunchError(ValueError):
    """The grid, the repository or the executor is not fit to submit (one line per problem)."""


@dataclass(frozen=True)
class Experiment:
    """One combination of the grid: its name and its ``key=value`` overrides (DVC's ``-S``)."""

    name: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class JobSpec:
    """Everything one job needs (pickled to the job by submitit)."""

    experiment: Experiment
    origin: str
    """The submitting repository (the clone's git remote ``origin``)."""
    rev: str
    """The commit the grid was validated against; every job clones it."""
    workdir: str
    """Folder of the clones (one per experiment, named after it)."""
    cache_dir: str | None = None
    """Shared DVC cache the clone uses (``dvc cache dir --local``); None with a remote."""
    remote: str | None = None
    """DVC remote to pull inputs from and push outputs to, instead of a shared cache."""
    cuda_visible_devices: str | None = None
    """The job's GPUs; None leaves what the scheduler set (Slurm with --gpus-per-job)."""
    force: bool = False
    """Replace an experiment of the same name in the submitting repository."""
    keep_clone: bool = False
    """Keep the clone after a successful push (failed jobs always keep theirs)."""
    python: str = sys.executable
    """The interpreter whose ``dvc`` runs the experiment (the submitter's environment)."""


# --- the grid -----------------------------------------------------------------------------------

def _parse(overrides: Sequence[str]) -> list[Any]:
    """Hydra overrides, parsed as ``dvc exp run -S`` parses them."""
    from dvc.utils.hydra import to_hydra_overrides
    from hydra.errors import OverrideParseException

    try:
        return to_hydra_overrides(list(overrides))
    except OverrideParseException as err:
        raise LaunchError(f"cannot parse -S {' '.join(overrides)!r}: "
                          f"{' '.join(str(err).split())}") from None


def expand_grid(sets: Sequence[str]) -> list[tuple[str, ...]]:
    """The cartesian product of the ``-S`` arguments, one tuple of ``key=value`` per
    experiment; the first ``-S`` varies slowest (as ``dvc exp run --queue`` orders them).

    ``key=a,b`` sweeps over a and b (``key=range(0,3)`` and ``key=choice(a,b)`` too);
    ``key=a`` is the same in every experiment. A path prefix other than params.yaml, a key
    given twice and non-discrete sweeps are refused.
    """
    if not sets:
        raise LaunchError("no grid: give at least one -S key=value[,value...]")
    axes: list[list[str]] = []
    keys: list[str] = []
    for text in sets:
        name = text.partition("=")[0]
        if ":" in name:
            path, _, text = text.partition(":")
            if path != "params.yaml":
                raise LaunchError(f"-S {path}:...: only params.yaml can be set here")
        (override,) = _parse([text])
        key = override.get_key_element()
        if key in keys:
            raise LaunchError(f"-S {key}: given twice; put every value in one -S {key}=a,b")
        keys.append(key)
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise LaunchError(f"-S {text}: only lists of values (a,b or range(...)) "
                                  "can be swept")
            axes.append([f"{key}={v}" for v in override.sweep_string_iterator()])
        else:
            axes.append([f"{key}={override.get_value_element_as_str()}"])
    return [tuple(combo) for combo in itertools.product(*axes)]


def _label(key: str, keys: Sequence[str]) -> str:
    """The shortest dotted tail of ``key`` that no other key of the grid ends with."""
    parts = key.lstrip("+~").split(".")
    for n in range(1, len(parts) + 1):
        tail = ".".join(parts[-n:])
        if not any(k != key and k.lstrip("+~").split(".")[-n:] == parts[-n:] for k in keys):
            return tail
    return ".".join(parts)


def experiment_name(overrides: Sequence[str], varying: Sequence[str], prefix: str = "") -> str:
    """A readable, deterministic name: the varying keys' short labels and values
    (``eps0.02-seed0``); every key when nothing varies. Characters git refuses in a ref
    become "_"; a name longer than :data:`MAX_NAME` keeps its start and gets a hash."""
    pairs = [o.split("=", 1) for o in overrides]
    shown = [(k, v) for k, v in pairs if k in varying] or pairs
    keys = [k for k, _ in shown]
    text = "-".join(_label(k, keys) + v.strip("'\"") for k, v in shown)
    name = prefix + re.sub(r"[^A-Za-z0-9._+=-]+", "_", text).strip("._")
    name = re.sub(r"\.{2,}", ".", name)
    if len(name) > MAX_NAME or name.endswith(".lock"):
        digest = hashlib.sha1("\0".join(overrides).encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME - 9].rstrip('.')}-{digest}"
    return name


def plan(sets: Sequence[str], prefix: str = "") -> list[Experiment]:
    """The experiments of a grid, named; names must differ and be valid git ref names."""
    combos = expand_grid(sets)
    varying = [combo[0].split("=", 1)[0] for combo in zip(*combos, strict=True)
               if len(set(combo)) > 1]
    experiments = [Experiment(experiment_name(c, varying, prefix), c) for c in combos]
    names = [e.name for e in experiments]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise LaunchError(f"the grid names {repeated} more than once (repeated values, or "
                          "values that differ only in characters a name cannot hold)")
    for name in names:
        if name.startswith("-") or subprocess.run(
                ["git", "check-ref-format", f"refs/exps/ab/cdef/{name}"]).returncode != 0:
            raise LaunchError(f"experiment name {name!r} is not a valid git ref name; "
                              "change --prefix")
    return experiments


# --- validation against the schema ------------------------------------------------------------

def apply_overrides(params: Mapping[str, Any], overrides: Sequence[str], *,
                    struct: bool = True) -> dict[str, Any]:
    """``params`` with ``overrides`` applied exactly as ``dvc exp run -S`` applies them.

    ``struct`` (DVC's mode) refuses keys params.yaml does not have, unless written ``+key``;
    ``struct=False`` adds them, so that the schema can say what was meant.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    config = OmegaConf.create(dict(params), flags={"allow_objects": True})
    OmegaConf.set_struct(config, struct)
    try:
        ConfigLoaderImpl._apply_overrides_to_config(_parse(overrides), config)
    except ConfigCompositionException as err:
        raise LaunchError(" ".join(str(err).split())) from None
    out = OmegaConf.to_object(config)
    assert isinstance(out, dict)
    return out


def check_grid(params: Mapping[str, Any], experiments: Sequence[Experiment]) -> None:
    """Apply each experiment's overrides to a copy of ``params`` and validate it.

    Raises:
        LaunchError: one line per distinct problem, each naming the key and what is allowed
            (an unknown key gets the closest known one).
    """
    problems: list[str] = []
    try:
        check_params(params)
    except ConfigError as err:
        raise LaunchError(f"params.yaml itself is invalid:\n{err}") from None
    for experiment in experiments:
        try:
            check_params(apply_overrides(params, experiment.overrides))
        except ConfigError as err:
            problems += str(err).splitlines()
        except LaunchError as err:  # a key params.yaml lacks: let the schema name it
            try:
                check_params(apply_overrides(params, experiment.overrides, struct=False))
            except ConfigError as schema_err:
                problems += str(schema_err).splitlines()
            else:
                problems.append(str(err))
    if problems:
        raise LaunchError("\n".join(dict.fromkeys(problems)))


# --- GPUs -------------------------------------------------------------------------------------

def detect_gpus() -> list[str]:
    """The GPUs local jobs are spread over: ``CUDA_VISIBLE_DEVICES`` when set (it already
    restricts this machine), else ``nvidia-smi -L``, else ``torch.cuda.device_count()``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    if shutil.which("nvidia-smi"):
        proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        if proc.returncode == 0:
            return [str(i) for i, line in enumerate(
                ln for ln in proc.stdout.splitlines() if ln.startswith("GPU "))]
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_for(slot: int, gpus: Sequence[str]) -> str:
    """``CUDA_VISIBLE_DEVICES`` of the job in local slot ``slot``: GPU ``slot mod n``; ""
    (no GPU) on a machine without one."""
    return gpus[slot % len(gpus)] if gpus else ""


# --- one job ------------------------------------------------------------------------------------

def job_commands(spec: JobSpec) -> list[list[str]]:
    """The commands a job runs in its clone, in order, after ``git clone``."""
    dvc = [spec.python, "-m", "dvc"]
    name = spec.experiment.name
    out: list[list[str]] = [["git", "checkout", "--quiet", "--detach", spec.rev]]
    if spec.cache_dir is not None:
        out += [[*dvc, "cache", "dir", "--local", spec.cache_dir],
                [*dvc, "config", "--local", "cache.shared", "group"]]
    run = [*dvc, "exp", "run", "-n", name]
    if spec.remote is not None:
        run.append("--pull")
    for override in spec.experiment.overrides:
        run += ["-S", override]
    push = [*dvc, "exp", "push"]
    push += ["--no-cache"] if spec.remote is None else ["--remote", spec.remote]
    if spec.force:
        push.append("--force")
    return [*out, run, [*push, "origin", name]]


def job_env(spec: JobSpec, clone: Path, base: Mapping[str, str] | None = None
            ) -> dict[str, str]:
    """The environment of a job's commands: this interpreter first on PATH, the clone's
    ``calib`` before any installed one, and the job's GPUs."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(Path(spec.python).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(clone), env.get("PYTHONPATH")] if p)
    if spec.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = spec.cuda_visible_devices
    return env


def _step(args: Sequence[str], cwd: Path, env: Mapping[str, str]) -> None:
    """Run one command of a job, its output going to the job's log."""
    print(f"[calib.launch] $ {' '.join(args)}", flush=True)
    code = subprocess.run(list(args), cwd=cwd, env=dict(env)).returncode
    if code != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed with exit code {code} in {cwd} "
                           "(its output is above, in this job's log)")


def run_experiment(spec: JobSpec) -> dict[str, Any]:
    """The job: clone, run the experiment, push it back to the submitting repository.

    Returns:
        the experiment's name, its commit, the clone's path (or None once removed), the GPUs it
        saw and how long it took.
    """
    start = time.monotonic()
    clone = Path(spec.workdir) / spec.experiment.name
    if clone.exists():  # a requeued or resubmitted job starts from scratch
        shutil.rmtree(clone)
    clone.parent.mkdir(parents=True, exist_ok=True)
    env = job_env(spec, clone)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    print(f"[calib.launch] experiment {spec.experiment.name} on {os.uname().nodename}, "
          f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '(unset)')!r}", flush=True)
    _step(["git", "clone", "--quiet", "--no-checkout", spec.origin, str(clone)], clone.parent,
          env)
    for key, value in (("user.name", "calib.launch"), ("user.email", "calib.launch@localhost")):
        if subprocess.run(["git", "config", key], cwd=clone, capture_output=True).returncode:
            subprocess.run(["git", "config", key, value], cwd=clone, check=True)
    for args in job_commands(spec):
        _step(args, clone, env)
    refs = subprocess.run(["git", "for-each-ref", "--format=%(objectname) %(refname)",
                           "refs/exps"], cwd=clone, capture_output=True, text=True, check=True)
    rev = next((line.split()[0] for line in refs.stdout.splitlines()
                if line.endswith(f"/{spec.experiment.name}")), "")
    if not spec.keep_clone:
        shutil.rmtree(clone, ignore_errors=True)
    return {"name": spec.experiment.name, "rev": rev,
            "clone": str(clone) if spec.keep_clone else None,
            "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
            "seconds": round(time.monotonic() - start, 1)}


# --- the submitting side ------------------------------------------------------------------------

def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LaunchError(f"git {' '.join(args)} failed in {repo}: "
                          f"{proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}")
    return proc.stdout


@dataclass(frozen=True)
class Repository:
    """The submitting repository as the jobs will see it."""

    root: Path
    rev: str
    params: dict[str, Any]


def inspect_repository(path: Path, allow_dirty: bool) -> Repository:
    """The repository's root, HEAD and committed params.yaml; refuses uncommitted changes
    to tracked files (the jobs clone HEAD and would not see them) unless ``allow_dirty``."""
    path = path.resolve()
    if not path.is_dir():
        raise LaunchError(f"--repo {path}: no such folder")
    root = Path(_git(path, "rev-parse", "--show-toplevel").strip())
    if not (root / ".dvc").is_dir():
        raise LaunchError(f"{root} is not a DVC repository (no .dvc/)")
    rev = _git(root, "rev-parse", "--verify", "HEAD^{commit}").strip()
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no").splitlines()
    if dirty and not allow_dirty:
        files = ", ".join(line[3:] for line in dirty[:5]) + (" ..." if len(dirty) > 5 else "")
        raise LaunchError(f"uncommitted changes to {files}: the jobs clone HEAD "
                          f"({rev[:7]}) and would not see them; commit them first, or pass "
                          "--allow-dirty to run HEAD as it is")
    try:
        params = yaml.safe_load(_git(root, "show", f"{rev}:params.yaml"))
    except LaunchError:
        raise LaunchError(f"params.yaml is not committed at HEAD ({rev[:7]})") from None
    return Repository(root, rev, params if isinstance(params, dict) else {})


def existing_experiments(repo: Repository) -> set[str]:
    """Names of the experiments already in the repository on top of its HEAD."""
    prefix = f"refs/exps/{repo.rev[:2]}/{repo.rev[2:]}/"
    refs = _git(repo.root, "for-each-ref", "--format=%(refname)", prefix).split()
    return {ref[len(prefix):] for ref in refs}


def dvc_cache_dir(root: Path) -> str:
    """The repository's DVC cache folder (absolute), as ``dvc cache dir`` reports it."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "cache", "dir"], cwd=root,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise LaunchError(f"`dvc cache dir` failed in {root}: {proc.stderr.strip()}")
    return str(Path(root, proc.stdout.strip()).resolve())


def dvc_remotes(root: Path) -> list[str]:
    """The DVC remotes a clone sees (those of the committed .dvc/config)."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "remote", "list", "--project"],
                          cwd=root, capture_output=True, text=True)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def check_executor(name: str) -> None:
    """Refuse an unknown executor, naming the allowed ones."""
    if name not in EXECUTORS:
        close = difflib.get_close_matches(name, EXECUTORS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise LaunchError(f"unknown executor {name!r}; {hint}choose one of: "
                          f"{', '.join(EXECUTORS)}")


def check_slurm(partition: str | None) -> list[str]:
    """That Slurm answers here (its programs exist, ``sinfo`` reaches the controller) and
    that ``partition`` is one of its partitions; returns the partitions."""
    missing = [p for p in ("sbatch", "srun", "sinfo", "squeue") if shutil.which(p) is None]
    if missing:
        raise LaunchError(f"Slurm is not reachable: {', '.join(missing)} not found on PATH "
                          "(run this on a Slurm login node, or use --executor local)")
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True,
                              timeout=60)
    except subprocess.TimeoutExpired:
        raise LaunchError("Slurm is not reachable: sinfo got no answer in 60 s") from None
    if proc.returncode != 0:
        reason = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise LaunchError(f"Slurm is not reachable: sinfo failed (exit {proc.returncode}): "
                          f"{reason}")
    partitions = [p.rstrip("*") for p in proc.stdout.split()]
    if not partitions:
        raise LaunchError("Slurm answers but lists no partition")
    if partition is not None and partition not in partitions:
        close = difflib.get_close_matches(partition, partitions, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise LaunchError(f"--partition {partition!r} is not a Slurm partition here; {hint}"
                          f"choose one of: {', '.join(partitions)}")
    return partitions


@dataclass
class Tracked:
    """One experiment on its way through the executor."""

    experiment: Experiment
    spec: JobSpec
    job: Any = None
    slot: int | None = None
    state: str = "waiting"
    """waiting, submitted, ok or FAILED."""
    detail: str = ""
    submitted_at: float = 0.0
    seconds: float = 0.0
    missing_since: float | None = None
    result: dict[str, Any] = field(default_factory=dict)


def stderr_tail(path: Path, lines: int = 5) -> list[str]:
    """The last lines a failed job's commands wrote to its stderr, before submitit's report
    of the exception (whose message the summary already shows); all of it when there is
    nothing before."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    cut = max((i for i, ln in enumerate(text) if ln.startswith("submitit ERROR")), default=0)
    return (text[:cut] or text)[-lines:]


def _slurm_active() -> set[str] | None:
    """Job ids this user has in Slurm's queue (pending or running); None if squeue fails
    (works without Slurm's accounting, which sacct needs)."""
    try:
        proc = subprocess.run(["squeue", "-h", "-o", "%i", "-u", getpass.getuser()],
                              capture_output=True, text=True, timeout=60)
    except (subprocess.TimeoutExpired, OSError):
        return None
    return set(proc.stdout.split()) if proc.returncode == 0 else None


def _settle(item: Tracked, executor: str, active: set[str] | None, now: float) -> bool:
    """Whether ``item``'s job has finished; records its outcome when it has."""
    job = item.job
    if job.paths.result_pickle.exists():
        item.seconds = now - item.submitted_at
        try:
            item.result = job.result()
        except Exception as err:  # the job raised: its message, then where to read more
            last = [ln for ln in str(err).splitlines() if ln.strip() and "---" not in ln]
            item.state, item.detail = "FAILED", _failure_line(last)
        else:
            item.state, item.detail = "ok", f"{item.result.get('rev', '')[:7]}"
        return True
    if executor == "local":
        finished = job.done()
    else:
        finished = active is not None and str(job.job_id) not in active
        if finished and item.missing_since is None:
            item.missing_since = now
        finished = finished and now - (item.missing_since or now) >= RESULT_GRACE_S
    if finished:
        item.seconds = now - item.submitted_at
        item.state, item.detail = "FAILED", ("the job ended without a result (killed, out of "
                                             "time or memory, or cancelled?)")
    return finished


def _failure_line(lines: Sequence[str]) -> str:
    """The most telling line of a job's exception: ours when it is there."""
    ours = [ln for ln in lines if "failed with exit code" in ln]
    line = (ours or lines or ["the job raised an exception"])[-1].strip()
    return line.removeprefix("RuntimeError: ")


def make_executor(kind: str, folder: Path, args: argparse.Namespace) -> Any:
    """A submitit AutoExecutor for ``kind`` ("slurm" or "local") with the job resources."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster=kind)
    parameters: dict[str, Any] = {"timeout_min": args.time}
    if args.cpus_per_job:
        parameters["cpus_per_task"] = args.cpus_per_job
    if kind == "slurm":
        if args.partition:
            parameters["slurm_partition"] = args.partition
        if args.gpus_per_job:
            parameters["slurm_gpus_per_node"] = args.gpus_per_job
    executor.update_parameters(**parameters)
    return executor


def _submit(executor: Any, item: Tracked) -> None:
    from calib.launch import run_experiment as job_function  # by module name, not __main__

    executor.update_parameters(name=f"calib-{item.experiment.name}")
    item.job = executor.submit(job_function, item.spec)
    item.state, item.submitted_at = "submitted", time.monotonic()
    gpu = ""
    if item.spec.cuda_visible_devices is not None:
        gpu = f", CUDA_VISIBLE_DEVICES={item.spec.cuda_visible_devices!r}"
    print(f"  submitted {item.experiment.name}: job {item.job.job_id}{gpu}", flush=True)


def run_grid(items: list[Tracked], executor: Any, gpus: Sequence[str] | None, jobs: int,
             poll_s: float, wait: bool) -> None:
    """Submit every experiment and, with ``wait``, poll until each has finished.

    Slurm (``gpus`` None) gets every job at once and sets each job's GPUs itself. Locally at
    most ``jobs`` run at a time, each in the lowest free slot, and slot i gets GPU i mod n
    (:func:`gpu_for`), so with one slot per GPU no two jobs share a GPU.
    """
    kind = "slurm" if gpus is None else "local"
    waiting = list(items)
    running: list[Tracked] = []
    free_slots = list(range(jobs))
    while waiting or (wait and running):
        while waiting and (gpus is None or free_slots):
            item = waiting.pop(0)
            if gpus is not None:
                item.slot = free_slots.pop(0)
                item.spec = replace(item.spec, cuda_visible_devices=gpu_for(item.slot, gpus))
            _submit(executor, item)
            running.append(item)
        if not wait:
            return
        time.sleep(poll_s)
        active = _slurm_active() if kind == "slurm" else None
        now = time.monotonic()
        for item in list(running):
            if _settle(item, kind, active, now):
                running.remove(item)
                if item.slot is not None:
                    free_slots = sorted([*free_slots, item.slot])
                detail = f": {item.detail}" if item.detail else ""
                print(f"  {item.state} {item.experiment.name} (job {item.job.job_id}, "
                      f"{_clock(item.seconds)}){detail}", flush=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}"


def summary(items: Sequence[Tracked]) -> str:
    """One line per experiment, then, for a failed one, where its log is and how it ends."""
    width = max(len(i.experiment.name) for i in items)
    lines = []
    for item in items:
        job = item.job.job_id if item.job is not None else "-"
        lines.append(f"  {item.state:<6} {item.experiment.name:<{width}}  job {job:<8} "
                     f"{_clock(item.seconds):>6}  {' '.join(item.experiment.overrides)}")
        if item.state == "FAILED":
            stderr = item.job.paths.stderr
            lines.append(f"         {item.detail}")
            lines.append(f"         stderr: {stderr}")
            lines += [f"         | {line}" for line in stderr_tail(Path(stderr))]
    ok = sum(i.state == "ok" for i in items)
    failed = sum(i.state == "FAILED" for i in items)
    return (f"{ok} succeeded, {failed} failed"
            + (f", {len(items) - ok - failed} not finished" if ok + failed < len(items) else "")
            + "\n" + "\n".join(lines))


# --- command line -------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m calib.launch",
        description="Run a grid of `dvc exp run -S` overrides as one job per experiment: on "
                    "Slurm (many machines) or on this machine, both through submitit. Each "
                    "job clones this repository, runs `dvc exp run`, and `dvc exp push`es the "
                    "experiment back here; `dvc exp show` lists them.")
    parser.add_argument("--executor", required=True, metavar="{slurm,local}",
                        help="slurm: one Slurm job per experiment; local: this machine")
    parser.add_argument("-S", "--set-param", dest="sets", action="append", default=[],
                        metavar="KEY=V1[,V2...]",
                        help="a params.yaml key and its values, as dvc exp run -S takes "
                             "them; several -S make a cartesian product")
    parser.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    parser.add_argument("--time", type=int, default=240, metavar="MIN",
                        help="time limit of each job in minutes (default: 240)")
    parser.add_argument("--gpus-per-job", type=int, default=0, metavar="N",
                        help="Slurm: GPUs per job (Slurm sets CUDA_VISIBLE_DEVICES); 0: none")
    parser.add_argument("--cpus-per-job", type=int, default=None, metavar="N",
                        help="CPUs per job (default: the scheduler's)")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="local: experiments at a time (default: one per GPU, or 1)")
    parser.add_argument("--gpus", default=None, metavar="LIST",
                        help="local: comma-separated GPUs to spread jobs over, job slot i "
                             "gets GPU i mod n (default: detected; '' for none)")
    parser.add_argument("--repo", type=Path, default=Path("."),
                        help="the submitting repository (default: here)")
    parser.add_argument("--folder", type=Path, default=None,
                        help=f"submitit's job files and logs (default: {LAUNCH_DIR}/logs)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help=f"where jobs clone the repository (default: {LAUNCH_DIR}/clones; "
                             "must be visible to every node)")
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--cache", type=Path, default=None,
                       help="shared DVC cache the jobs use (default: this repository's)")
    store.add_argument("--remote", default=None,
                       help="use this DVC remote instead of a shared cache")
    parser.add_argument("--prefix", default="", help="prefix of every experiment name")
    parser.add_argument("--force", action="store_true",
                        help="replace experiments of the same names")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="submit although tracked files have uncommitted changes")
    parser.add_argument("--keep-clones", action="store_true",
                        help="keep each job's clone after a successful push")
    parser.add_argument("--no-wait", action="store_true",
                        help="slurm: submit and return without waiting")
    parser.add_argument("--poll", type=float, default=10.0, metavar="S",
                        help="seconds between checks while waiting (default: 10)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything and print the plan; submit nothing")
    return parser.parse_args(argv)


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    """Relative paths in params.yaml (data.mirror, data.checksums) are the repository's."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def prepare(args: argparse.Namespace) -> tuple[Repository, list[Tracked], list[str] | None]:
    """Every check that precedes submission: the repository, the experiments with their job
    specs, and the local GPUs (None on Slurm). Sets ``args.jobs`` for the local executor."""
    check_executor(args.executor)
    for option in ("time", "gpus_per_job", "cpus_per_job", "jobs"):
        value = getattr(args, option)
        if value is not None and value < (0 if option == "gpus_per_job" else 1):
            raise LaunchError(f"--{option.replace('_', '-')} must be at least "
                              f"{0 if option == 'gpus_per_job' else 1}, got {value}")
    if args.poll <= 0:
        raise LaunchError(f"--poll must be positive, got {args.poll}")
    if args.executor == "local" and (args.partition or args.gpus_per_job or args.no_wait):
        raise LaunchError("--partition, --gpus-per-job and --no-wait are Slurm options; "
                          "locally use --jobs and --gpus")
    if args.executor == "slurm" and (args.jobs is not None or args.gpus is not None):
        raise LaunchError("--jobs and --gpus are local options; on Slurm use "
                          "--gpus-per-job (Slurm runs as many jobs as it has room for)")
    if args.executor == "slurm":  # before the slower checks of the grid
        check_slurm(args.partition)
    experiments = plan(args.sets, args.prefix)
    repo = inspect_repository(args.repo, args.allow_dirty)
    with _cwd(repo.root):
        check_grid(repo.params, experiments)
    clash = sorted(existing_experiments(repo) & {e.name for e in experiments})
    if clash and not args.force:
        raise LaunchError(f"experiments {clash} already exist on HEAD ({repo.rev[:7]}); "
                          "pass --force to replace them, or --prefix to name these apart")
    if args.remote is not None:
        remotes = dvc_remotes(repo.root)
        if args.remote not in remotes:
            raise LaunchError(f"--remote {args.remote!r} is not a DVC remote of the committed "
                              f".dvc/config; choose one of: {', '.join(remotes) or '(none)'}")
        cache_dir = None
    else:
        cache_dir = str(args.cache.resolve()) if args.cache else dvc_cache_dir(repo.root)
    if args.executor == "slurm":
        gpus: list[str] | None = None
    else:
        gpus = detect_gpus() if args.gpus is None else [
            g.strip() for g in args.gpus.split(",") if g.strip()]
        args.jobs = args.jobs or max(1, len(gpus))
    workdir = (args.workdir or repo.root / LAUNCH_DIR / "clones").resolve()
    items = []
    for i, experiment in enumerate(experiments):
        if gpus is not None:  # the slot, hence the GPU, is final when the job starts
            cuda: str | None = gpu_for(i, gpus)
        else:  # Slurm sets it for the GPUs it allocates; no GPU asked, none seen
            cuda = None if args.gpus_per_job else ""
        spec = JobSpec(experiment=experiment, origin=str(repo.root), rev=repo.rev,
                       workdir=str(workdir), cache_dir=cache_dir, remote=args.remote,
                       cuda_visible_devices=cuda, force=args.force,
                       keep_clone=args.keep_clones)
        items.append(Tracked(experiment, spec))
    return repo, items, gpus


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        repo, items, gpus = prepare(args)
    except LaunchError as err:
        lines = str(err).splitlines()
        print(f"error: {lines[0]}" + "".join(f"\n  {ln}" for ln in lines[1:]),
              file=sys.stderr)
        return 2
    where = {"slurm": f"Slurm{' partition ' + args.partition if args.partition else ''}",
             "local": f"this machine, {args.jobs} at a time"}[args.executor]
    store = (f"DVC remote {args.remote!r}" if args.remote
             else f"shared cache {items[0].spec.cache_dir}")
    count = f"{len(items)} experiment{'s' if len(items) > 1 else ''}"
    print(f"calib.launch: {count} of {repo.root} at {repo.rev[:7]} on {where} ({store})")
    if args.dry_run:
        for item in items:
            print(f"  {item.experiment.name}: {' '.join(item.experiment.overrides)}")
        print(f"each job: git clone {repo.root} <workdir>/<name>, then")
        print("\n".join(f"  $ {' '.join(c)}" for c in job_commands(items[0].spec)))
        print("dry run: nothing submitted")
        return 0
    folder = (args.folder or repo.root / LAUNCH_DIR / "logs").resolve()
    executor = make_executor(args.executor, folder, args)
    try:
        run_grid(items, executor, gpus, args.jobs or 1, args.poll, wait=not args.no_wait)
    except KeyboardInterrupt:
        left = ("the Slurm jobs keep running (squeue; scancel to stop them)"
                if args.executor == "slurm" else "local jobs stop with this process")
        print(f"\ninterrupted: {left}", file=sys.stderr)
        return 130
    if args.no_wait:
        print(f"submitted {len(items)} jobs; logs in {folder}; when they are done, "
              f"`dvc exp show` here lists the experiments")
        return 0
    print(summary(items))
    if all(item.state == "ok" for item in items):
        print("`dvc exp show` here lists them; `dvc exp apply <name>` takes one into the "
              "workspace")
        return 0
    return 1


if __name__ == "__main__":
    from calib.launch import main as _main  # the job function pickles as calib.launch's

    raise SystemExit(_main())
