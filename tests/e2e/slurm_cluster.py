"""A real single-node SLURM on localhost for the end-to-end test: munged + slurmctld + slurmd from
Debian's slurm-wlm and munge packages, as root, no cgroups (proctrack/linuxproc, task/none), no
accounting daemon. Uses a cluster that already answers (sinfo) instead of starting one.

By hand:  python tests/e2e/slurm_cluster.py        (starts it; prints the SLURM_CONF to export)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HOME = Path("/tmp/longtail-slurm")
CONF = HOME / "slurm.conf"
MUNGE_DIR = Path("/run/munge")

SLURM_CONF = """\
ClusterName=longtail-test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
KillWait=5
StateSaveLocation={home}/state
SlurmdSpoolDir={home}/spool
SlurmctldPidFile={home}/slurmctld.pid
SlurmdPidFile={home}/slurmd.pid
SlurmctldLogFile={home}/slurmctld.log
SlurmdLogFile={home}/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class Unavailable(Exception):
    """A real SLURM cannot be had here (the reason is one line)."""


def _ok(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env)


def _node_up(env: dict) -> bool:
    try:
        out = _ok(["sinfo", "-h", "-o", "%t"], env)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s.strip().rstrip("*") in ("idle", "mix", "alloc") for s in out.stdout.split())


def _last_line(path: Path) -> str:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def start() -> tuple[dict, list[Path]]:
    """Environment additions for the SLURM commands ({} or SLURM_CONF) and the pid files of the
    daemons this call started (empty when a cluster was already up)."""
    if _node_up(dict(os.environ)):
        return {}, []
    env = {**os.environ, "SLURM_CONF": str(CONF)}
    if CONF.exists() and _node_up(env):
        return {"SLURM_CONF": str(CONF)}, []
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel") if not shutil.which(t)]
    if missing:
        raise Unavailable(f"SLURM is not installed ({', '.join(missing)} missing; "
                          f"apt-get install slurm-wlm munge, as .ci/run does)")
    if os.geteuid() != 0:
        raise Unavailable("starting slurmctld/slurmd/munged needs root")
    started: list[Path] = []
    if _ok(["munge", "-n"]).returncode != 0:
        MUNGE_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_DIR, "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            _ok(["mungekey", "--create"])
        out = _ok(["runuser", "-u", "munge", "--", "munged"])
        if out.returncode != 0:
            raise Unavailable(f"munged did not start: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
        started.append(MUNGE_DIR / "munged.pid")
    for d in ("state", "spool"):
        (HOME / d).mkdir(parents=True, exist_ok=True)
    CONF.write_text(SLURM_CONF.format(home=HOME, cpus=os.cpu_count() or 1))
    for daemon, args in (("slurmctld", ["-f", str(CONF)]), ("slurmd", ["-f", str(CONF), "-N", "localhost"])):
        pid = HOME / f"{daemon}.pid"
        out = _ok([daemon, *args], env)
        if out.returncode != 0:
            stop(started)
            raise Unavailable(f"{daemon} did not start: {_last_line(HOME / f'{daemon}.log')}")
        started.append(pid)
    deadline = time.time() + 60
    while time.time() < deadline:
        if _node_up(env):
            return {"SLURM_CONF": str(CONF)}, started
        time.sleep(1)
    stop(started)
    raise Unavailable(f"the SLURM node did not come up in 60 s: {_last_line(HOME / 'slurmctld.log')}")


def stop(pid_files: list[Path]) -> None:
    """End the daemons start() started (by their pid files), newest first."""
    for pid_file in reversed(pid_files):
        try:
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            pass


if __name__ == "__main__":
    try:
        extra, _ = start()
    except Unavailable as exc:
        sys.exit(f"no SLURM: {exc}")
    print(f"SLURM is up; export SLURM_CONF={extra.get('SLURM_CONF', os.environ.get('SLURM_CONF', '(default)'))}")
