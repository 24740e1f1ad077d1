"""A real one-node Slurm cluster on this machine, started and stopped by the tests.

Debian's ``slurm-wlm`` and ``munge`` packages (``scripts/setup.sh`` installs them where apt is
usable as root) provide the daemons. Everything lives under one temporary folder and touches
nothing system-wide: a private munge key and socket, a minimal ``slurm.conf`` (one node with
this machine's CPUs, one default partition, no cgroups, no accounting), state and spool
folders, free TCP ports, and the daemons run in the foreground as children of the test, so
stopping them is killing our own processes. Clients (``sinfo``, ``sbatch``, ``srun``) find the
cluster through ``SLURM_CONF``, which :attr:`SlurmCluster.env` carries.

Where the cluster cannot start (not root, packages missing, a daemon failing) :func:`start`
raises :class:`SlurmUnavailable` with the exact reason; the tests skip on it, or fail where
``CI`` is set.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: The programs the cluster needs, by the Debian package that ships them.
PROGRAMS = {"munge": ("munged", "munge"),
            "slurm-wlm": ("slurmctld", "slurmd", "sinfo", "sbatch", "srun", "squeue", "scancel")}
PARTITION = "debug"
#: Memory the node offers (MB): modest, far below what any test machine has.
REAL_MEMORY_MB = 1000


class SlurmUnavailable(RuntimeError):
    """The one-node cluster cannot start here; the message says exactly why."""


@dataclass
class SlurmCluster:
    """A running one-node cluster: its folder, config and the environment clients need."""

    root: Path
    conf: Path
    node: str
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """Variables that point Slurm's clients (and the jobs' ``srun``) at this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of every daemon's log (for failure messages)."""
        out = []
        for log in sorted((self.root / "log").glob("*.log")):
            text = log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        """Stop the daemons (slurmd, slurmctld, then munged), killing any that linger."""
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.processes.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


def missing_programs() -> dict[str, list[str]]:
    """Debian package -> its programs not found on PATH (empty when all are there)."""
    out = {}
    for package, programs in PROGRAMS.items():
        missing = [p for p in programs if shutil.which(p) is None]
        if missing:
            out[package] = missing
    return out


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def slurm_conf(root: Path, node: str, cpus: int, ports: tuple[int, int]) -> str:
    """A minimal slurm.conf: one node (``cpus`` CPUs) in one default partition, no cgroups."""
    return "\n".join([
        "ClusterName=calibtest",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge' / 'munge.socket'}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        f"PlugStackConfig={root / 'plugstack.conf'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/builtin",
        "MpiDefault=none",
        "ReturnToService=2",
        "MailProg=/bin/true",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        "InactiveLimit=0",
        "KillWait=5",
        "MinJobAge=300",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={REAL_MEMORY_MB} "
        "State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def _wait(predicate, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.processes.items():
            if proc.poll() is not None:
                raise SlurmUnavailable(f"{name} exited with code {proc.returncode} while "
                                       f"waiting for {what}:\n{cluster.log_tail()}")
        if predicate():
            return
        time.sleep(0.3)
    raise SlurmUnavailable(f"timed out after {timeout:.0f} s waiting for {what}:\n"
                           f"{cluster.log_tail()}")


def _daemon(cluster: SlurmCluster, name: str, args: list[str]) -> None:
    log = (cluster.root / "log" / f"{name}.out.log").open("ab")
    cluster.processes[name] = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, **cluster.env}, start_new_session=True)
    log.close()


def start(root: Path, timeout: float = 60) -> SlurmCluster:
    """Start munged, slurmctld and slurmd under ``root``; return once the node is idle.

    Raises:
        SlurmUnavailable: not root, a program missing, or a daemon failing (with its log).
    """
    if os.geteuid() != 0:
        raise SlurmUnavailable("the test cluster's daemons run as root (SlurmUser=root); "
                               f"this test runs as uid {os.geteuid()}")
    missing = missing_programs()
    if missing:
        listed = "; ".join(f"{pkg}: {', '.join(progs)}" for pkg, progs in missing.items())
        raise SlurmUnavailable(f"Slurm programs not found ({listed}); install the Debian "
                               "packages: apt-get install slurm-wlm munge (scripts/setup.sh "
                               "does it as root)")
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("munge", "state", "spool", "run", "log"):
        (root / sub).mkdir(mode=0o700, exist_ok=True)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (root / "plugstack.conf").write_text("", encoding="utf-8")
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, node, os.cpu_count() or 1, tuple(_free_ports(2))),
                    encoding="utf-8")
    cluster = SlurmCluster(root=root, conf=conf, node=node)
    munge_socket = root / "munge" / "munge.socket"
    try:
        _daemon(cluster, "munged", [
            "munged", "--foreground", "--force", f"--key-file={key}",
            f"--socket={munge_socket}", f"--pid-file={root / 'run' / 'munged.pid'}",
            f"--log-file={root / 'log' / 'munged.log'}",
            f"--seed-file={root / 'munge' / 'munged.seed'}"])
        _wait(munge_socket.exists, timeout, "munged's socket", cluster)
        _daemon(cluster, "slurmctld", ["slurmctld", "-D", "-c", "-f", str(conf)])
        _daemon(cluster, "slurmd", ["slurmd", "-D", "-f", str(conf), "-N", node])

        def node_idle() -> bool:
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True,
                                  text=True, env={**os.environ, **cluster.env}, timeout=30)
            return proc.returncode == 0 and proc.stdout.split() == ["idle"]

        _wait(node_idle, timeout, f"node {node} to be idle in sinfo", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextlib.contextmanager
def running(root: Path, timeout: float = 60) -> Iterator[SlurmCluster]:
    """:func:`start`, then :meth:`SlurmCluster.stop` on the way out."""
    cluster = start(root, timeout)
    try:
        yield cluster
    finally:
        cluster.stop()
