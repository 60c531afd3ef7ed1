"""Sending runs of the experiment matrix to SLURM (or to submitit's local executor) instead of running them here.

:func:`rmsae.runner.execute_runs` decides what runs and in which order (dependencies, skips,
blocks); a :class:`SubmititLauncher` only replaces how one run executes. Each run becomes one
submitit job that executes the notebook with papermill on a compute node and writes the run's
notebook, results and record into the shared runs folder, exactly as a local run would. The
waiting side polls the job, so runs start in dependency order without SLURM job dependencies.

A job's id is written next to the run (``<stage>.job.json``) when it is submitted. If the waiting
runner is interrupted, the jobs keep running. A later ``rmsae run`` finds the id of a job that is
still pending or running and waits for it rather than submitting a duplicate.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from .storage import atomic_write_json

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "slurm", "submitit-local")
# submitit's names for the clusters behind each executor choice.
_CLUSTERS = {"slurm": "slurm", "submitit-local": "local"}
# SLURM states of a job that has not finished yet (squeue/sacct spellings, as submitit reports them).
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "CONFIGURING", "COMPLETING")
JOB_SUFFIX = ".job.json"
_SETTING_KEYS = ("partition", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "additional_parameters")


@dataclass(frozen=True)
class JobSettings:
    """Resources requested for one job: partition, GPUs and CPUs, memory (GB), time limit (minutes) and extra ``sbatch`` options.

    ``additional_parameters`` maps ``sbatch`` option names without the dashes (``account``,
    ``qos``, ``constraint``) to values. None leaves a value to the cluster's default.
    """

    partition: str | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    timeout_min: int = 240
    additional_parameters: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("gpus_per_node", "cpus_per_task", "timeout_min"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "gpus_per_node" else 1)):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.mem_gb is not None and (isinstance(self.mem_gb, bool) or not isinstance(self.mem_gb, (int, float)) or self.mem_gb <= 0):
            raise ValueError(f"mem_gb must be a positive number, got {self.mem_gb!r}.")
        if not isinstance(self.additional_parameters, Mapping):
            raise ValueError(f"additional_parameters must be a mapping of sbatch options, got {self.additional_parameters!r}.")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "settings") -> "JobSettings":
        unknown = sorted(set(values) - set(_SETTING_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {list(_SETTING_KEYS)}.")
        return cls(**dict(values))

    def merged(self, values: Mapping[str, Any]) -> "JobSettings":
        """Return these settings with ``values`` (a partial mapping) replacing or, for extra options, extending them."""
        values = dict(values)
        extra = {**self.additional_parameters, **values.pop("additional_parameters", {})}
        return replace(self, **values, additional_parameters=extra)

    def executor_parameters(self, name: str) -> dict[str, Any]:
        """Return the keyword arguments of ``submitit.AutoExecutor.update_parameters`` for a job called ``name``."""
        parameters: dict[str, Any] = {"name": name, "timeout_min": self.timeout_min, "nodes": 1, "tasks_per_node": 1}
        if self.gpus_per_node is not None:
            parameters["gpus_per_node"] = self.gpus_per_node
        if self.cpus_per_task is not None:
            parameters["cpus_per_task"] = self.cpus_per_task
        if self.mem_gb is not None:
            parameters["mem_gb"] = self.mem_gb
        if self.partition is not None:
            parameters["slurm_partition"] = self.partition
        if self.additional_parameters:
            parameters["slurm_additional_parameters"] = dict(self.additional_parameters)
        return parameters


def _run_in_job(run) -> dict[str, Any]:
    """Execute one run inside a submitit job and return what the waiting side needs."""
    from .runner import execute_run

    execute_run(run)
    return {"status": run.status, "error": run.error, "seconds": run.seconds}


class SubmititLauncher:
    """Execute runs as submitit jobs: on SLURM (``executor="slurm"``) or as local processes (``"submitit-local"``).

    ``logs`` is the folder for submitit's job files and logs (it must be on a file system that the
    compute nodes share). ``settings`` apply to every job and ``stage_settings`` override them per
    stage. ``poll_seconds`` is how often a waiting run checks its job.
    """

    def __init__(
        self,
        executor: str,
        logs: str | Path,
        settings: JobSettings | None = None,
        stage_settings: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        poll_seconds: float = 10.0,
    ) -> None:
        if executor not in _CLUSTERS:
            raise ValueError(f"executor must be one of {sorted(_CLUSTERS)} for submitit, got {executor!r}.")
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be positive, got {poll_seconds!r}.")
        # Checked here rather than in a worker thread, where the error would surface as a failed run.
        if importlib.util.find_spec("submitit") is None:
            raise RuntimeError("The SLURM and submitit-local executors need submitit: pip install 'rmsae[cluster]'.")

        self.executor = executor
        self.cluster = _CLUSTERS[executor]
        self.logs = Path(logs)
        self.settings = settings or JobSettings()
        self.stage_settings = {stage: dict(values) for stage, values in (stage_settings or {}).items()}
        self.poll_seconds = poll_seconds

    def settings_for(self, stage: str) -> JobSettings:
        return self.settings.merged(self.stage_settings.get(stage, {}))

    def job_file(self, run) -> Path:
        return run.folder / f"{run.stage.name}{JOB_SUFFIX}"

    def __call__(self, run) -> None:
        """Execute ``run`` as a job (or wait for its job still in the queue) and copy the outcome into ``run``."""
        import submitit

        run.folder.mkdir(parents=True, exist_ok=True)
        job = self._reattach(run)
        if job is None:
            executor = submitit.AutoExecutor(folder=self.logs, cluster=self.cluster)
            executor.update_parameters(**self.settings_for(run.stage.name).executor_parameters(f"rmsae:{run.name}"))
            job = executor.submit(_run_in_job, run)
            atomic_write_json(self.job_file(run), {"job_id": str(job.job_id), "cluster": self.cluster, "run": run.name,
                                                   "fingerprint": run.fingerprint, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            logger.info("submitted %s as %s job %s", run.name, self.cluster, job.job_id)
        while not job.done():
            time.sleep(self.poll_seconds)
        try:
            outcome = job.result()
        except Exception as error:  # the job died outside the notebook: time limit, node failure, out of memory
            run.status = "failed"
            run.error = (f"{self.cluster} job {job.job_id} failed: {type(error).__name__}: {str(error).strip().splitlines()[-1:]}; "
                         f"logs: {job.paths.stdout} and {job.paths.stderr}")
            from .runner import _write_record

            _write_record(run)
            return
        run.status, run.error, run.seconds = outcome["status"], outcome["error"], outcome["seconds"]
        if run.status == "failed":
            run.error = f"{run.error}; job logs: {job.paths.stdout} and {job.paths.stderr}"

    def _reattach(self, run):
        """Return the job of an earlier submission of this exact run if SLURM still has it queued or running."""
        if self.cluster != "slurm":
            return None
        try:
            submitted = json.loads(self.job_file(run).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if submitted.get("fingerprint") != run.fingerprint or submitted.get("cluster") != "slurm":
            return None
        import submitit

        job = submitit.SlurmJob(folder=self.logs, job_id=str(submitted["job_id"]))
        state = job.state
        if state not in ACTIVE_STATES:
            return None
        logger.info("waiting for %s, already submitted as SLURM job %s (%s)", run.name, job.job_id, state)
        return job
