"""Pull instead of retrain: share the DVC cache through a lab's remote (``make pull``).

A lab adds a DVC remote once (S3, SSH, HTTP or a shared folder: :data:`REMOTE_EXAMPLES`) and
``make push``es its cache after ``dvc repro``; a reader runs ``make pull`` and gets the trained
checkpoints, the data splits, the per-sample attack records and the executed notebooks, after
which ``dvc status`` shows nothing to rerun. Both commands check first that a remote is
configured and, when none is, say how to add one instead of failing inside DVC.

Run as ``python -m calib.remote {pull,push,status} [targets ...]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

#: One line per kind of remote, as the README shows them (``-d`` makes it the default).
REMOTE_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("a shared folder or NFS mount", "dvc remote add -d lab /shared/dvc/calib-attacks"),
    ("SSH (pip install 'dvc[ssh]')", "dvc remote add -d lab ssh://user@host/srv/dvc/calib-attacks"),
    ("S3 (pip install 'dvc[s3]')", "dvc remote add -d lab s3://bucket/calib-attacks"),
    ("HTTP, read-only for readers", "dvc remote add -d lab https://example.org/dvc/calib-attacks"),
)


class RemoteError(RuntimeError):
    """No usable DVC remote or repository; the message says what to do."""


def how_to_add_a_remote() -> str:
    """The advice printed when no remote is configured."""
    width = max(len(kind) for kind, _ in REMOTE_EXAMPLES)
    lines = "\n".join(f"  {kind + ':':<{width + 1}}  {cmd}" for kind, cmd in REMOTE_EXAMPLES)
    return ("no DVC remote is configured, so there is nothing to pull from or push to.\n"
            "Add your lab's remote once (commit .dvc/config to share it with readers), e.g.\n"
            f"{lines}\n"
            "Credentials belong in .dvc/config.local (dvc remote modify --local ...), never in "
            "git.\nWithout a remote, `make reproduce` recomputes everything instead.")


def _dvc(args: Sequence[str], cwd: Path, capture: bool = True) -> subprocess.CompletedProcess:
    exe = shutil.which("dvc")
    if exe is None:
        raise RemoteError("the dvc command is not on PATH; run `make setup` first")
    return subprocess.run([exe, *args], cwd=cwd, text=True,
                          capture_output=capture, check=False)


def default_remote(repo: Path) -> str | None:
    """Name of the remote ``dvc pull``/``dvc push`` would use, or None when there is none.

    A single configured remote counts even when it is not marked default: the advice then is
    to make it the default, which :func:`check_remote` says.
    """
    if not (repo / ".dvc").is_dir():
        raise RemoteError(f"{repo} is not a DVC repository (no .dvc folder); run this from "
                          "the project's root")
    default = _dvc(["config", "core.remote"], repo)
    if default.returncode == 0 and default.stdout.strip():
        return default.stdout.strip()
    return None


def configured_remotes(repo: Path) -> list[str]:
    """Names of every configured remote (``dvc remote list``)."""
    proc = _dvc(["remote", "list"], repo)
    if proc.returncode != 0:
        raise RemoteError(f"dvc remote list failed: {proc.stderr.strip()}")
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def check_remote(repo: Path, remote: str | None = None) -> str:
    """The remote to use; :class:`RemoteError` with advice when none is usable."""
    names = configured_remotes(repo)
    if remote is not None:
        if remote not in names:
            allowed = ", ".join(names) if names else "none is configured"
            raise RemoteError(f"remote {remote!r} is not configured (configured: {allowed})")
        return remote
    default = default_remote(repo)
    if default is not None:
        if default not in names:
            raise RemoteError(f"core.remote names {default!r}, which is not configured; "
                              f"configured: {', '.join(names) or 'none'}")
        return default
    if len(names) == 1:
        return names[0]
    if names:
        raise RemoteError(f"several remotes are configured ({', '.join(names)}) and none is "
                          f"the default; choose one: dvc remote default {names[0]}")
    raise RemoteError(how_to_add_a_remote())


def transfer(action: str, repo: Path, targets: Sequence[str] = (), remote: str | None = None,
             jobs: int | None = None) -> int:
    """``dvc pull`` or ``dvc push`` against the checked remote; DVC's own exit status."""
    if action not in ("pull", "push"):
        raise ValueError(f"action must be 'pull' or 'push', got {action!r}")
    name = check_remote(repo, remote)
    args = [action, "--remote", name]
    if jobs is not None:
        args += ["--jobs", str(jobs)]
    print(f"dvc {action} from/to remote {name!r}", flush=True)
    proc = _dvc([*args, *targets], repo, capture=False)
    if proc.returncode == 0 and action == "pull":
        print(pipeline_status(repo))
    return proc.returncode


def pipeline_status(repo: Path) -> str:
    """One line: whether ``dvc repro`` would rerun anything after a pull."""
    proc = _dvc(["status", "--quiet"], repo)
    if proc.returncode == 0:
        return "dvc status: up to date; `dvc repro` has nothing to rerun."
    changed = [line.rstrip(":") for line in _dvc(["status"], repo).stdout.splitlines()
               if line and not line.startswith((" ", "\t"))]
    return (f"dvc status: {len(changed)} stage(s) would rerun ({', '.join(changed[:8])}"
            f"{', ...' if len(changed) > 8 else ''}); the remote lacks their outputs or "
            "this checkout differs from what was pushed.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calib.remote", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("pull", "push", "status"),
                        help="pull: fetch the cache; push: upload it; status: the remote in use")
    parser.add_argument("targets", nargs="*", help="stages or paths (default: everything)")
    parser.add_argument("-r", "--remote", help="remote name (default: the default remote)")
    parser.add_argument("-j", "--jobs", type=int, help="parallel transfers")
    args = parser.parse_args(argv)
    repo = Path.cwd()
    try:
        if args.action == "status":
            print(f"remote: {check_remote(repo, args.remote)}")
            print(pipeline_status(repo))
            return 0
        return transfer(args.action, repo, args.targets, args.remote, args.jobs)
    except RemoteError as exc:
        print(f"make {args.action}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
