"""Tests for calib.launch: a parameter grid as one job per experiment, on Slurm or locally.

Fast tests cover the grid (expansion, names), every check that must stop a launch before
anything is submitted (the executor, unknown keys with "did you mean", bad values, Slurm out of
reach, uncommitted changes, existing names), and how jobs get their GPUs. End-to-end tests run
a two-experiment grid through submitit's LocalExecutor and through a real one-node Slurm
cluster that the test starts (tests/slurm_cluster.py), each on a toy git + DVC repository
whose params.yaml is the smoke profile (so the schema applies) and whose one cheap stage reads
``attack.eps`` and ``seed``; ``dvc exp show`` in the submitting repository must then list both
experiments with their parameters and metrics. Without Slurm (not root, packages missing) the
Slurm test skips saying why; where ``CI`` is set it fails instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import slurm_cluster
from pipeline_repo import env as stage_env
from pipeline_repo import run

from calib import launch
from calib.launch import Experiment, JobSpec, LaunchError
from calib.profiles import dump_params, render_profile

ROOT = Path(__file__).resolve().parents[1]
#: The end-to-end grid: two experiments (the seed differs from the profile's, 0, in both).
GRID = ["-S", "attack.eps=0.02,0.05", "-S", "seed=1"]
GRID_NAMES = {"eps0.02": 0.02, "eps0.05": 0.05}
#: A seed the toy stage refuses, to see a failed job reported.
UNLUCKY_SEED = 13

TOY_STAGE = f'''\
"""Toy stage: reads attack.eps and seed, writes metrics, the job's GPUs and a cached output."""
import json
import os
import sys

import yaml

params = yaml.safe_load(open("params.yaml", encoding="utf-8"))
eps, seed = params["attack"]["eps"], params["seed"]
if seed == {UNLUCKY_SEED}:
    sys.exit(f"toy stage: seed {{seed}} is refused on purpose")
os.makedirs("out", exist_ok=True)
with open("out/table.txt", "w", encoding="utf-8") as fh:
    fh.write(f"eps={{eps}} seed={{seed}}\\n" * 100)
with open("metrics.json", "w", encoding="utf-8") as fh:
    json.dump({{"score": eps * 10 + seed}}, fh)
with open("env.json", "w", encoding="utf-8") as fh:
    json.dump({{"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}}, fh)
'''

TOY_DVC_YAML = """\
stages:
  toy:
    cmd: python stage.py
    deps: [stage.py]
    params: [attack.eps, seed]
    outs: [out]
    metrics:
      - metrics.json:
          cache: false
      - env.json:
          cache: false
"""


# --- a toy submitting repository ---------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_params() -> dict[str, Any]:
    return render_profile("smoke", ROOT / "profiles")


def make_toy_repo(dest: Path, params: dict[str, Any]) -> Path:
    """A committed git + DVC repository: smoke params.yaml, one cheap stage."""
    dest.mkdir(parents=True)
    (dest / "params.yaml").write_text(dump_params(params), encoding="utf-8")
    (dest / "stage.py").write_text(TOY_STAGE, encoding="utf-8")
    (dest / "dvc.yaml").write_text(TOY_DVC_YAML, encoding="utf-8")
    run(["git", "init", "-q"], dest)
    run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm",
         "toy"], dest)
    return dest


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory, smoke_params) -> Path:
    """Shared by the tests that must stop before submitting (they leave it unchanged)."""
    return make_toy_repo(tmp_path_factory.mktemp("launch") / "repo", smoke_params)


def launch_cli(repo: Path, *args: str, extra_env: dict[str, str] | None = None,
               timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calib.launch", *args], cwd=repo,
                          env=stage_env(extra_env), capture_output=True, text=True,
                          timeout=timeout)


def experiments(repo: Path) -> dict[str, dict[str, Any]]:
    """``dvc exp show --json`` in ``repo``: name -> its params.yaml, metrics and env.json."""
    proc = run([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo)
    out = {}
    for baseline in json.loads(proc.stdout):
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                out[rev["name"]] = {
                    "params": data["params"]["params.yaml"]["data"],
                    "metrics": data["metrics"]["metrics.json"]["data"],
                    "env": data["metrics"]["env.json"]["data"],
                    "rev": rev["rev"]}
    return out


def check_grid_results(repo: Path) -> dict[str, dict[str, Any]]:
    """``dvc exp show`` in ``repo`` lists exactly the experiments of GRID, with their params
    and metrics, and the outputs they cached are in ``repo``'s cache."""
    found = experiments(repo)
    assert set(found) == set(GRID_NAMES), f"dvc exp show lists {sorted(found)}"
    cache = Path(run([sys.executable, "-m", "dvc", "cache", "dir"], repo).stdout.strip())
    for name, eps in GRID_NAMES.items():
        exp = found[name]
        assert exp["params"]["attack"]["eps"] == eps and exp["params"]["seed"] == 1
        assert exp["metrics"]["score"] == pytest.approx(eps * 10 + 1)
        lock = run(["git", "show", f"{exp['rev']}:dvc.lock"], repo).stdout
        md5 = next(line.split()[-1] for line in lock.splitlines() if "md5:" in line
                   and ".dir" in line)
        assert (cache / "files" / "md5" / md5[:2] / md5[2:]).is_file(), "output not shared"
    return found


# --- the grid ---------------------------------------------------------------------------------

def test_the_grid_is_the_cartesian_product_first_key_slowest():
    assert launch.expand_grid(["attack.eps=0.02,0.05", "seed=0,1"]) == [
        ("attack.eps=0.02", "seed=0"), ("attack.eps=0.02", "seed=1"),
        ("attack.eps=0.05", "seed=0"), ("attack.eps=0.05", "seed=1")]
    assert launch.expand_grid(["seed=range(0,3)", "models.resnet.train.epochs=6"]) == [
        ("seed=0", "models.resnet.train.epochs=6"), ("seed=1", "models.resnet.train.epochs=6"),
        ("seed=2", "models.resnet.train.epochs=6")]
    assert launch.expand_grid(["params.yaml:seed=4"]) == [("seed=4",)]
    # a quoted comma is one value, as with dvc exp run -S
    assert launch.expand_grid(["attack.kinds='uca,oca'"]) == [("attack.kinds='uca,oca'",)]


@pytest.mark.parametrize("sets,message", [
    ([], "no grid"),
    (["seed=0", "seed=1"], "seed: given twice"),
    (["other.yaml:seed=1"], "only params.yaml"),
    (["seed=interval(0,1)"], "only lists of values"),
    (["attack.eps=["], "cannot parse"),
])
def test_the_grid_refuses_what_it_cannot_expand(sets, message):
    with pytest.raises(LaunchError, match=message):
        launch.expand_grid(sets)


def test_names_say_what_varies_and_are_deterministic():
    names = [e.name for e in launch.plan(["attack.eps=0.02,0.05", "seed=0,1", "device=cpu"])]
    assert names == ["eps0.02-seed0", "eps0.02-seed1", "eps0.05-seed0", "eps0.05-seed1"]
    assert [e.name for e in launch.plan(["seed=3"], prefix="try-")] == ["try-seed3"]
    # two keys ending alike keep enough of their path to tell them apart
    both = launch.plan(["attack.eps=0.1,0.2", "defend.options.pgd_at.eps=0.03"])
    assert [e.name for e in both] == ["eps0.1", "eps0.2"]
    both = launch.plan(["attack.eps=0.1,0.2", "defend.options.pgd_at.eps=0.03,0.04"])
    assert both[0].name == "attack.eps0.1-pgd_at.eps0.03"
    # characters a git ref cannot hold are replaced; long names keep their start and a hash
    assert launch.plan(["attack.kinds='uca,oca'"])[0].name == "kindsuca_oca"
    long = launch.experiment_name([f"models.resnet.train.epochs={'9' * 100}"], [])
    assert len(long) <= launch.MAX_NAME and long.startswith("epochs999")
    assert long == launch.experiment_name([f"models.resnet.train.epochs={'9' * 100}"], [])


def test_names_must_differ():
    with pytest.raises(LaunchError, match="more than once"):
        launch.plan(["seed=1,1"])


def test_overrides_apply_as_dvc_applies_them(tmp_path, smoke_params):
    from dvc.utils.hydra import apply_overrides as dvc_apply

    overrides = ["attack.eps=0.04", "seed=7", "sweep.eps=[0.1,0.2]", "device=cuda:1"]
    path = tmp_path / "params.yaml"
    path.write_text(dump_params(smoke_params), encoding="utf-8")
    dvc_apply(path, overrides)
    import yaml

    assert launch.apply_overrides(smoke_params, overrides) == yaml.safe_load(path.read_text())


def test_unknown_keys_get_did_you_mean_and_bad_values_the_allowed_range(smoke_params):
    grid = launch.plan(["attack.epss=0.02,3", "seed=-1"])
    with pytest.raises(LaunchError) as err:
        launch.check_grid(smoke_params, grid)
    lines = str(err.value).splitlines()
    assert "seed: -1 is out of range; must be >= 0" in lines
    assert any(ln.startswith("attack.epss: unknown key; did you mean 'eps'?") for ln in lines)
    assert len(lines) == len(set(lines)) == 2  # one line per distinct problem
    with pytest.raises(LaunchError, match=r"attack\.eps: 3 is out of range; must be in \(0, 1\]"):
        launch.check_grid(smoke_params, launch.plan(["attack.eps=0.02,3"]))
    launch.check_grid(smoke_params, launch.plan(["attack.eps=0.02,0.5", "seed=0,1"]))


# --- every check stops the launch before anything is submitted ---------------------------------

@pytest.fixture
def no_submission(monkeypatch, tmp_path):
    """main() in-process, with submitit out of reach: any submission fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a job was submitted although a check failed")

    monkeypatch.setattr(launch, "make_executor", refuse)
    monkeypatch.setattr(launch, "_submit", refuse)
    return tmp_path / "logs"


def fake_slurm(folder: Path, sinfo: str) -> Path:
    """A bin folder with stand-ins for Slurm's clients; ``sinfo`` is its script body."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in {"sbatch": "exit 1", "srun": "exit 1", "squeue": "exit 0",
                       "sinfo": sinfo}.items():
        path = folder / name
        path.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
        path.chmod(0o755)
    return folder


UNREACHABLE = ('echo "slurm_load_partitions: Unable to contact slurm controller (connect '
               'failure)" >&2; exit 1')


@pytest.mark.parametrize("args,message", [
    (["--executor", "slurmm"], "error: unknown executor 'slurmm'; did you mean 'slurm'? "
                               "choose one of: slurm, local"),
    (["--executor", "kubernetes"], "error: unknown executor 'kubernetes'; choose one of: "
                                   "slurm, local"),
    (["--executor", "local", "-S", "attack.epss=0.02"],
     "error: attack.epss: unknown key; did you mean 'eps'?"),
    (["--executor", "local", "-S", "seed=0,-1"], "error: seed: -1 is out of range"),
    (["--executor", "local", "-S", "seed=0", "--partition", "gpu"],
     "error: --partition, --gpus-per-job and --no-wait are Slurm options"),
    (["--executor", "local", "-S", "seed=0", "--jobs", "0"], "error: --jobs must be at least 1"),
    (["--executor", "slurm", "-S", "seed=0"],
     "error: Slurm is not reachable: sinfo failed (exit 1): slurm_load_partitions: Unable to "
     "contact slurm controller (connect failure)"),
    (["--executor", "slurm", "-S", "seed=0", "--partition", "gpus"],
     "error: --partition 'gpus' is not a Slurm partition here; did you mean 'gpu'? choose one "
     "of: cpu, gpu"),
])
def test_a_failed_check_stops_before_submitting(args, message, toy_repo, no_submission,
                                                monkeypatch, capsys, tmp_path):
    sinfo = UNREACHABLE if "--partition" not in args else 'printf "cpu*\\ngpu\\n"'
    bin_dir = fake_slurm(tmp_path / "bin", sinfo)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    code = launch.main([*args, "--repo", str(toy_repo), "--folder", str(no_submission)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(message), err
    assert "Traceback" not in err
    assert not no_submission.exists()


def test_without_slurm_programs_it_says_so(toy_repo, no_submission, monkeypatch, capsys,
                                           tmp_path):
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)
    code = launch.main(["--executor", "slurm", "-S", "seed=0", "--repo", str(toy_repo)])
    assert code == 2
    assert capsys.readouterr().err.startswith(
        "error: Slurm is not reachable: sbatch, srun, sinfo, squeue not found on PATH")


def test_unknown_executor_exits_2_in_one_line_from_the_command_line(toy_repo):
    proc = launch_cli(toy_repo, "--executor", "pbs", "-S", "seed=0")
    assert proc.returncode == 2
    assert proc.stderr == "error: unknown executor 'pbs'; choose one of: slurm, local\n"


def test_uncommitted_changes_and_existing_names_stop_the_launch(tmp_path, smoke_params,
                                                                no_submission, capsys):
    repo = make_toy_repo(tmp_path / "repo", smoke_params)
    (repo / "stage.py").write_text(TOY_STAGE + "\n", encoding="utf-8")
    args = ["--executor", "local", "-S", "seed=0,1", "--repo", str(repo)]
    assert launch.main(args) == 2
    assert "uncommitted changes to stage.py: the jobs clone HEAD" in capsys.readouterr().err
    run(["git", "checkout", "--", "stage.py"], repo)
    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    run(["git", "update-ref", f"refs/exps/{head[:2]}/{head[2:]}/seed1", head], repo)
    assert launch.main(args) == 2
    assert "experiments ['seed1'] already exist on HEAD" in capsys.readouterr().err
    assert launch.main([*args, "--dry-run", "--force"]) == 0
    assert launch.main([*args, "--dry-run", "--prefix", "again-"]) == 0


def test_dry_run_prints_the_plan_and_submits_nothing(toy_repo, no_submission, capsys):
    code = launch.main(["--executor", "local", *GRID, "--repo", str(toy_repo), "--gpus", "",
                        "--dry-run", "--folder", str(no_submission)])
    out = capsys.readouterr().out
    assert code == 0
    assert "2 experiments" in out and "dry run: nothing submitted" in out
    assert "eps0.05: attack.eps=0.05 seed=1" in out
    assert "-m dvc exp run -n eps0.02 -S attack.eps=0.02 -S seed=1" in out
    assert "-m dvc exp push --no-cache origin eps0.02" in out
    assert not no_submission.exists()


# --- what a job runs, and its GPUs --------------------------------------------------------------

def spec(**kwargs: Any) -> JobSpec:
    return JobSpec(**{"experiment": Experiment("eps0.1", ("attack.eps=0.1",)),
                      "origin": "/repo", "rev": "abc123", "workdir": "/clones",
                      "cache_dir": "/repo/.dvc/cache", **kwargs})


def test_job_commands_share_the_cache_or_use_a_remote():
    commands = [" ".join(c[1:]) if c[0] == sys.executable else " ".join(c)
                for c in launch.job_commands(spec())]
    assert commands == ["git checkout --quiet --detach abc123",
                        "-m dvc cache dir --local /repo/.dvc/cache",
                        "-m dvc config --local cache.shared group",
                        "-m dvc exp run -n eps0.1 -S attack.eps=0.1",
                        "-m dvc exp push --no-cache origin eps0.1"]
    remote = launch.job_commands(spec(cache_dir=None, remote="lab", force=True))
    assert [" ".join(c[1:]) for c in remote[1:]] == [
        "-m dvc exp run -n eps0.1 --pull -S attack.eps=0.1",
        "-m dvc exp push --remote lab --force origin eps0.1"]


def test_job_env_sets_the_gpus_and_the_clones_code_first():
    base = {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    env = launch.job_env(spec(cuda_visible_devices="2"), Path("/clones/x"), base)
    assert env["CUDA_VISIBLE_DEVICES"] == "2"
    assert env["PYTHONPATH"] == "/clones/x"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert launch.job_env(spec(cuda_visible_devices=""), Path("/c"), base)[
        "CUDA_VISIBLE_DEVICES"] == ""
    # None: what the scheduler set (Slurm with --gpus-per-job) stays
    assert launch.job_env(spec(), Path("/c"), base)["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


def test_gpu_for_spreads_slots_over_the_gpus():
    assert [launch.gpu_for(i, ["0", "1"]) for i in range(5)] == ["0", "1", "0", "1", "0"]
    assert launch.gpu_for(3, ["GPU-ab", "GPU-cd", "GPU-ef"]) == "GPU-ab"
    assert launch.gpu_for(0, []) == ""


def test_detect_gpus_respects_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert launch.detect_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launch.detect_gpus() == []


class FakeJob:
    """Finishes after ``polls`` checks, writing its result file."""

    def __init__(self, folder: Path, job_id: int, polls: int) -> None:
        self.job_id = str(job_id)
        self.polls = polls
        self.paths = argparse.Namespace(result_pickle=folder / f"{job_id}.pkl",
                                        stderr=folder / f"{job_id}.err")

    def done(self) -> bool:
        self.polls -= 1
        if self.polls <= 0:
            self.paths.result_pickle.touch()
        return self.polls <= 0

    def result(self) -> dict[str, Any]:
        return {"rev": "0123456789"}


class FakeExecutor:
    """Records what was submitted, and which jobs were running at that moment."""

    def __init__(self, folder: Path, polls: list[int]) -> None:
        self.folder, self.polls = folder, polls
        self.submitted: list[tuple[str, str | None, list[str]]] = []
        self.jobs: list[FakeJob] = []

    def update_parameters(self, **kwargs: Any) -> None:
        pass

    def submit(self, function: Any, job_spec: JobSpec) -> FakeJob:
        assert function is launch.run_experiment
        running = [j.job_id for j in self.jobs if not j.paths.result_pickle.exists()]
        self.submitted.append((job_spec.experiment.name, job_spec.cuda_visible_devices,
                               running))
        job = FakeJob(self.folder, len(self.jobs), self.polls[len(self.jobs)])
        self.jobs.append(job)
        return job


def test_local_jobs_run_at_most_jobs_at_a_time_each_on_a_free_gpu(tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setattr(launch, "_settle", lambda item, kind, active, now: _fake_settle(item))
    items = [launch.Tracked(e, spec(experiment=e)) for e in
             [Experiment(f"e{i}", (f"seed={i}",)) for i in range(4)]]
    # e0 runs long, e1 short: e2 takes e1's slot and GPU 1, not GPU 0 which e0 still holds
    executor = FakeExecutor(tmp_path, polls=[4, 1, 1, 1])
    launch.run_grid(items, executor, ["0", "1"], jobs=2, poll_s=0.001, wait=True)
    assert executor.submitted == [("e0", "0", []), ("e1", "1", ["0"]), ("e2", "1", ["0"]),
                                  ("e3", "1", ["0"])]
    assert [i.state for i in items] == ["ok"] * 4
    assert "4 succeeded, 0 failed" in launch.summary(items)


def _fake_settle(item: launch.Tracked) -> bool:
    if item.job.done():
        item.state, item.detail = "ok", "0123456"
        return True
    return False


def test_a_slurm_job_that_leaves_the_queue_without_a_result_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "RESULT_GRACE_S", 5.0)
    item = launch.Tracked(Experiment("e0", ("seed=0",)), spec(),
                          job=FakeJob(tmp_path, 7, polls=99))
    assert not launch._settle(item, "slurm", {"7"}, now=100.0)  # still queued
    assert not launch._settle(item, "slurm", None, now=101.0)  # squeue failed: unknown
    assert not launch._settle(item, "slurm", set(), now=102.0)  # gone: give the file time
    assert launch._settle(item, "slurm", set(), now=107.0)
    assert item.state == "FAILED" and "without a result" in item.detail
    assert "stderr: " + str(tmp_path / "7.err") in launch.summary([item])


def test_slurm_jobs_see_no_gpu_unless_they_ask_for_one(toy_repo, tmp_path, monkeypatch):
    bin_dir = fake_slurm(tmp_path / "bin", 'echo "debug*"')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    base = ["--executor", "slurm", "-S", "seed=0", "--repo", str(toy_repo)]
    _, items, gpus = launch.prepare(launch.parse_args(base))
    assert gpus is None and items[0].spec.cuda_visible_devices == ""
    _, items, _ = launch.prepare(launch.parse_args([*base, "--gpus-per-job", "1"]))
    assert items[0].spec.cuda_visible_devices is None  # Slurm sets it


# --- end to end ---------------------------------------------------------------------------------

def test_local_executor_runs_the_grid_into_dvc_exp_show(tmp_path, smoke_params):
    repo = make_toy_repo(tmp_path / "repo", smoke_params)
    proc = launch_cli(repo, "--executor", "local", *GRID, "--gpus", "0,1", "--poll", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 succeeded, 0 failed" in proc.stdout
    found = check_grid_results(repo)
    # two slots over two GPUs: each running job had its own
    assert {found[n]["env"]["cuda_visible_devices"] for n in found} == {"0", "1"}
    assert not list((repo / ".dvc" / "tmp" / "launch" / "clones").iterdir()), "clones kept"
    assert run(["git", "status", "--porcelain"], repo).stdout == ""


def test_a_failed_job_is_reported_with_its_stderr(tmp_path, smoke_params):
    repo = make_toy_repo(tmp_path / "repo", smoke_params)
    proc = launch_cli(repo, "--executor", "local", "-S", f"seed=0,{UNLUCKY_SEED}", "--gpus", "",
                      "--jobs", "2", "--poll", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "1 succeeded, 1 failed" in out
    failed = out[out.index(f"FAILED seed{UNLUCKY_SEED}"):]
    assert "dvc exp run -n seed13 -S seed=13` failed with exit code" in failed
    stderr = Path(failed.split("stderr: ", 1)[1].split()[0])
    assert stderr.is_file() and f"seed {UNLUCKY_SEED} is refused" in stderr.read_text()
    # the tail shown is what the failing command wrote, not the job's traceback
    assert f"| toy stage: seed {UNLUCKY_SEED} is refused on purpose" in failed
    assert "| ERROR: failed to reproduce 'toy'" in failed
    assert set(experiments(repo)) == {"seed0"}
    assert (repo / ".dvc" / "tmp" / "launch" / "clones" / "seed13").is_dir(), "kept to look at"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A real one-node Slurm cluster for this module's tests."""
    cluster = start_slurm_or_skip(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


def start_slurm_or_skip(root: Path) -> slurm_cluster.SlurmCluster:
    """The cluster; otherwise skip saying why, or fail where ``CI`` is set."""
    try:
        return slurm_cluster.start(root)
    except slurm_cluster.SlurmUnavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"a real Slurm cluster is required on CI: {err}")
        pytest.skip(f"no Slurm cluster here: {err}")


def test_slurm_tests_skip_without_slurm_but_fail_on_ci(monkeypatch, tmp_path):
    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 1000)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"run as root.*uid 1000"):
        start_slurm_or_skip(tmp_path)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"required on CI: .*run as root"):
        start_slurm_or_skip(tmp_path)


def test_slurm_runs_the_grid_into_dvc_exp_show(tmp_path, smoke_params, slurm):
    repo = make_toy_repo(tmp_path / "repo", smoke_params)
    sinfo = run(["sinfo"], repo, extra_env=slurm.env).stdout
    print(f"$ sinfo\n{sinfo}")
    assert " idle " in sinfo
    proc = launch_cli(repo, "--executor", "slurm", *GRID, "--partition",
                      slurm_cluster.PARTITION, "--cpus-per-job", "1", "--time", "10",
                      "--poll", "1", extra_env=slurm.env)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr + slurm.log_tail()
    submitted = [ln for ln in proc.stdout.splitlines() if "submitted" in ln]
    assert len(submitted) == 2 and all(re.search(r": job \d+,", ln) for ln in submitted)
    found = check_grid_results(repo)
    assert {found[n]["env"]["cuda_visible_devices"] for n in found} == {""}  # no GPU asked
    print(run([sys.executable, "-m", "dvc", "exp", "show", "--no-pager", "--only-changed"],
              repo, extra_env={"COLUMNS": "200"}).stdout)
