"""A real single-node SLURM (Debian's slurm-wlm with munge), started here, runs matrix stages through the SLURM executor.

Skipped, with the reason, where SLURM is not installed or its daemons cannot start (they need root).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from rmsae.executors import JOB_SUFFIX, JobSettings, SubmititLauncher
from rmsae.matrix import load_matrix
from rmsae.runner import execute_runs, plan_runs

from test_runner import write_project

pytest.importorskip("submitit")

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _slurm_conf(root: Path, host: str) -> str:
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return "\n".join([
        "ClusterName=rmsaetest", f"SlurmctldHost={host}", f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={root / 'munge.socket'}",
        "SlurmUser=root", "SlurmdUser=root", f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "MpiDefault=none", "ReturnToService=2", "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory={int(memory_mb * 0.8)} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", "",
    ])


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """Start munged, slurmctld and slurmd on this machine with a configuration of their own; yield its path."""
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"SLURM is not installed here ({', '.join(missing)} not found); `apt-get install slurm-wlm munge` enables this test")
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start jobs, and this test runs as another user")
    root = tmp_path_factory.mktemp("slurm")
    for folder in ("state", "spool"):
        (root / folder).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host))
    environment = {**os.environ, "SLURM_CONF": str(conf)}

    processes = []
    try:
        subprocess.run(["munged", f"--key-file={key}", f"--socket={root / 'munge.socket'}", f"--pid-file={root / 'munged.pid'}",
                        f"--seed-file={root / 'munge.seed'}", f"--log-file={root / 'munged.log'}", "--force"],
                       check=True, capture_output=True, timeout=30)
        for daemon in ("slurmctld", "slurmd"):
            processes.append(subprocess.Popen([daemon, "-D"], env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1)
        deadline = time.monotonic() + 30
        state = ""
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=environment, capture_output=True, text=True).stdout.strip()
            if state == "idle":
                break
            time.sleep(1)
        else:
            log = (root / "slurmctld.log").read_text()[-800:] if (root / "slurmctld.log").exists() else ""
            pytest.skip(f"the test SLURM did not come up (node state {state!r}); slurmctld log ends: {log}")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
        for process in processes:
            process.terminate()
        pytest.skip(f"the test SLURM could not start: {error}")
    yield conf

    for process in processes:
        process.terminate()
        process.wait(timeout=30)
    pid_file = root / "munged.pid"
    if pid_file.exists():
        subprocess.run(["kill", pid_file.read_text().strip()], check=False)


def test_slurm_executor_runs_stage(slurm_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster))
    path = write_project(tmp_path)
    launcher = SubmititLauncher("slurm", tmp_path / "runs" / "t" / ".jobs", JobSettings(timeout_min=10, cpus_per_task=1), poll_seconds=1)
    runs = execute_runs(plan_runs(load_matrix(path), "t", models=["alpha"]), jobs=2, launch=launcher)
    assert {run.name: run.status for run in runs} == {"t/alpha/probe": "ok", "t/probe (page)": "ok", "t/alpha/layer0/layered": "ok"}
    submitted = json.loads((tmp_path / "runs" / "t" / "alpha" / f"probe{JOB_SUFFIX}").read_text())
    assert submitted["cluster"] == "slurm"
    results = json.loads((tmp_path / "runs" / "t" / "alpha" / "probe.json").read_text())
    assert results == {"value": 1, "lines": 3, "model": "alpha"}
    log = next((tmp_path / "runs" / "t" / ".jobs").glob(f"{submitted['job_id']}_*_log.out"))
    assert log.is_file()

    again = execute_runs(plan_runs(load_matrix(path), "t", models=["alpha"]), jobs=2, launch=launcher)
    assert [run.status for run in again] == ["skipped"] * 3
