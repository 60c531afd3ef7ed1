"""Executing the matrix through submitit: job settings, the local executor end to end, and reattaching to queued jobs."""

from __future__ import annotations

import json

import pytest
import yaml

from rmsae.cli import main
from rmsae.executors import JOB_SUFFIX, JobSettings, SubmititLauncher
from rmsae.matrix import MatrixError, load_matrix
from rmsae.runner import execute_runs, plan_runs

from test_runner import write_project

pytest.importorskip("submitit")


def test_job_settings_to_executor_parameters():
    settings = JobSettings(partition="gpu", gpus_per_node=2, cpus_per_task=8, mem_gb=64, timeout_min=120,
                           additional_parameters={"account": "lab"})
    parameters = settings.executor_parameters("rmsae:t/alpha/probe")
    assert parameters == {"name": "rmsae:t/alpha/probe", "timeout_min": 120, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": 2,
                          "cpus_per_task": 8, "mem_gb": 64, "slurm_partition": "gpu", "slurm_additional_parameters": {"account": "lab"}}
    merged = settings.merged({"timeout_min": 30, "additional_parameters": {"qos": "short"}})
    assert merged.timeout_min == 30
    assert merged.additional_parameters == {"account": "lab", "qos": "short"}
    assert JobSettings().executor_parameters("x") == {"name": "x", "timeout_min": 240, "nodes": 1, "tasks_per_node": 1}


@pytest.mark.parametrize("values, message", [
    ({"gpus_per_node": -1}, "gpus_per_node must be a positive integer"),
    ({"cpus_per_task": 0}, "cpus_per_task must be a positive integer"),
    ({"timeout_min": "soon"}, "timeout_min must be a positive integer"),
    ({"mem_gb": 0}, "mem_gb must be a positive number"),
    ({"gpu": 1}, r"unknown key\(s\) \['gpu'\]"),
])
def test_job_settings_reject_bad_values(values, message):
    with pytest.raises(ValueError, match=message):
        JobSettings.from_mapping(values)


def test_matrix_slurm_entry_is_checked(tmp_path):
    path = write_project(tmp_path)
    document = yaml.safe_load(path.read_text())
    document["profiles"]["t"]["slurm"] = {"partition": "gpu", "timeout_min": 60, "stages": {"layered": {"gpus_per_node": 1}}}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    assert load_matrix(path).profile("t").slurm == {"partition": "gpu", "timeout_min": 60, "stages": {"layered": {"gpus_per_node": 1}}}
    document["profiles"]["t"]["slurm"]["stages"] = {"plot": {}}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    with pytest.raises(MatrixError, match="slurm.stages.plot: no such stage"):
        load_matrix(path)
    document["profiles"]["t"]["slurm"] = {"mem_gb": -4}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    with pytest.raises(MatrixError, match="mem_gb must be a positive number"):
        load_matrix(path)


def test_local_executor_runs_matrix_in_order(tmp_path):
    path = write_project(tmp_path)
    launcher = SubmititLauncher("submitit-local", tmp_path / "jobs", JobSettings(timeout_min=10), poll_seconds=0.2)
    runs = execute_runs(plan_runs(load_matrix(path), "t"), jobs=4, launch=launcher)
    assert {run.name: run.status for run in runs} == {
        "t/alpha/probe": "ok", "t/beta/probe": "ok", "t/probe (page)": "ok", "t/alpha/layer0/layered": "ok", "t/beta/layer0/layered": "ok"}
    records = {run.name: json.loads(run.record_path.read_text()) for run in runs}
    assert records["t/alpha/layer0/layered"]["finished"] >= records["t/alpha/probe"]["finished"]
    submitted = json.loads((tmp_path / "runs" / "t" / "alpha" / f"probe{JOB_SUFFIX}").read_text())
    assert submitted["cluster"] == "local"
    assert submitted["run"] == "t/alpha/probe"
    # The page ran in this process: no job file for it.
    assert not (tmp_path / "runs" / "t" / f"probe{JOB_SUFFIX}").exists()

    again = execute_runs(plan_runs(load_matrix(path), "t"), jobs=4, launch=launcher)
    assert [run.status for run in again] == ["skipped"] * 5


def test_local_executor_reports_failed_job_logs(tmp_path):
    path = write_project(tmp_path, fail_for="beta")
    launcher = SubmititLauncher("submitit-local", tmp_path / "jobs", poll_seconds=0.2)
    runs = {run.name: run for run in execute_runs(plan_runs(load_matrix(path), "t"), jobs=2, launch=launcher)}
    assert runs["t/alpha/probe"].status == "ok"
    assert runs["t/beta/probe"].status == "failed"
    assert "deliberate failure for beta" in runs["t/beta/probe"].error
    assert "job logs:" in runs["t/beta/probe"].error
    assert runs["t/beta/layer0/layered"].status == "blocked"


def test_cli_sends_runs_through_submitit(tmp_path, capsys):
    path = write_project(tmp_path)
    status = main(["run", "--matrix", str(path), "--profile", "t", "--executor", "submitit-local", "--slurm-time", "5",
                   "--slurm-option", "account=lab", "--stages", "probe"])
    assert status == 0
    assert "3 runs: 3 executed" in capsys.readouterr().out
    assert (tmp_path / "runs" / "t" / ".jobs").is_dir()
    assert main(["run", "--matrix", str(path), "--profile", "t", "--executor", "slurm", "--slurm-option", "account"]) == 2


def test_reattach_waits_for_queued_slurm_job(tmp_path, monkeypatch):
    import submitit

    path = write_project(tmp_path)
    run = next(run for run in plan_runs(load_matrix(path), "t") if run.name == "t/alpha/probe")
    run.fingerprint = "abc"
    run.folder.mkdir(parents=True)
    launcher = SubmititLauncher("slurm", tmp_path / "jobs")
    job_file = launcher.job_file(run)
    job_file.write_text(json.dumps({"job_id": "4242", "cluster": "slurm", "fingerprint": "abc"}))

    class QueuedJob:
        def __init__(self, folder, job_id):
            self.job_id, self.state = job_id, states[job_id]

    states = {"4242": "RUNNING"}
    monkeypatch.setattr(submitit, "SlurmJob", QueuedJob)
    assert launcher._reattach(run).job_id == "4242"
    states["4242"] = "COMPLETED"
    assert launcher._reattach(run) is None
    states["4242"] = "PENDING"
    run.fingerprint = "changed inputs"
    assert launcher._reattach(run) is None
    assert SubmititLauncher("submitit-local", tmp_path / "jobs")._reattach(run) is None
