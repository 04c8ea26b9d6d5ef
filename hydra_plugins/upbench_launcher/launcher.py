"""Hydra launchers for clusters: ``hydra/launcher=slurm`` (SLURM through submitit) and ``hydra/launcher=local``
(the same jobs as local processes).  Built on hydra-submitit-launcher's job body, so a job runs exactly as a local
``upbench run`` would, and on submitit's checkpointing protocol (a preempted or timed-out job is requeued and the
task resumes from its own checkpoint).  What upbench adds:

* combinations that already have a finished result are not submitted at all, so re-running a command after a
  crash or a ``scancel`` runs only what is missing;
* a job record per sweep (``<results>/jobs/<sweep>.json``: overrides, config hash, job id, log paths) that
  ``upbench status`` reads;
* one failed job never hides the others: with ``wait: true`` every job is waited for and the failures are listed
  with their logs at the end (the command then exits 1).

Hydra imports every ``hydra_plugins`` module of an environment when any Hydra application starts, so this module
imports only Hydra's own light modules at import time; submitit, hydra-submitit-launcher's config and upbench are
imported when a launch actually happens."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher

log = logging.getLogger("upbench.launcher")


#: parameters every submitit executor takes under its own name (the rest get the executor's prefix)
SHARED_PARAMS = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name",
                 "stderr_to_stdout"}
#: jobs of the last launch in this process that did not finish: (label, reason, log path)
FAILED: List[Dict[str, Any]] = []


def _plain(cfg: Any) -> Dict[str, Any]:
    """A job's config as the job itself sees it (Hydra hands the task its config without the ``hydra`` node)."""
    from omegaconf import open_dict

    from upbench.config import to_container

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return to_container(cfg)


class UpbenchSubmititLauncher(Launcher):
    _EXECUTOR = "abstract"

    def __init__(self, **params: Any) -> None:
        from omegaconf import OmegaConf

        self.params = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                       for k, v in params.items()}
        self.config: Any = None
        self.hydra_context: Any = None
        self.task_function: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def __call__(self, sweep_overrides: List[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: Dict[type, Singleton]) -> JobReturn:
        """The job body, run by submitit on the node: the job's config from its overrides, then Hydra's job runner
        (working directory, logging, the task function) exactly as a local multirun job."""
        import submitit
        from omegaconf import open_dict

        Singleton.set_state(singleton_state)
        setup_globals()
        from upbench.jobs import write_outcome

        env = submitit.JobEnvironment()
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, sweep_overrides)
        with open_dict(sweep_config.hydra.job) as job:
            job.id = env.job_id
            sweep_config.hydra.job.num = job_num
        ret = run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=sweep_config,
                      job_dir_key=job_dir_key, job_subdir_key="hydra.sweep.subdir")
        # the outcome as JSON beside submitit's files: `upbench status` reads it and never unpickles anything
        failed = ret.status == JobStatus.FAILED
        detail = " ".join(str(ret._return_value).split())[:300] if failed else "job returned"
        write_outcome(str(env.paths.folder), str(env.job_id), "failed" if failed else "finished", detail)
        return ret

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's preemption / timeout protocol: resubmit this job body with the same arguments (the task
        resumes from its own checkpoint)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def _executor(self, params: Dict[str, Any]):
        import submitit

        folder = params.pop("submitit_folder")
        init = {}
        if "max_num_timeout" in params:   # how many times a timed-out job is requeued
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(folder=folder, cluster=self._EXECUTOR, **init)
        executor.update_parameters(**{k if k in SHARED_PARAMS else f"{self._EXECUTOR}_{k}": v
                                      for k, v in params.items()})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from upbench import jobs
        from upbench.files import atomic_write
        from upbench.results import config_hash

        assert self.config is not None and self.hydra_context is not None
        params = dict(self.params)
        wait = bool(params.pop("wait", True))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        config_name = str(self.config.hydra.job.config_name)
        records: List[Dict[str, Any]] = []
        pending: List[tuple] = []
        results_dir: Optional[str] = None
        for i, overrides in enumerate(job_overrides):
            num = initial_job_idx + i
            cfg = _plain(self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides)))
            results_dir = results_dir or cfg["paths"]["results"]
            label = " ".join(filter_overrides(overrides)) or "(defaults)"
            result, done = jobs.expected_result(config_name, cfg)
            record = {"num": num, "label": label, "overrides": list(overrides), "config_name": config_name,
                      "config_hash": config_hash(cfg), "executor": self._EXECUTOR,
                      "result": str(result) if result else None}
            if done:
                log.info(f"#{num} {label}: already finished ({result}); not submitted")
                records.append({**record, "submitted": False})
                continue
            records.append({**record, "submitted": True})
            pending.append((list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state()))
        submitted = [r for r in records if r["submitted"]]
        handles = []
        if pending:
            executor = self._executor(params)
            handles = executor.map_array(self, *zip(*pending))
            for record, job in zip(submitted, handles):
                record.update(job_id=str(job.job_id), stdout=str(job.paths.stdout), stderr=str(job.paths.stderr),
                              submitit_folder=str(job.paths.folder))
                log.info(f"#{record['num']} {record['label']}: submitted as {self._EXECUTOR} job {job.job_id}")
        sweep = {"sweep": sweep_dir.name, "sweep_dir": str(sweep_dir), "config_name": config_name,
                 "results": str(Path(results_dir or ".").resolve()), "jobs": records}
        record_path = jobs.record_path(results_dir or ".", sweep_dir.name)
        with atomic_write(record_path) as tmp:
            tmp.write_text(json.dumps(sweep, indent=1, default=str))
        log.info(f"{len(submitted)} of {len(records)} jobs submitted; `upbench status --sweep {sweep_dir.name}` "
                 f"shows their state (record: {record_path})")
        FAILED.clear()
        if wait:
            self._wait(list(zip(submitted, handles)))
        return [JobReturn(overrides=r["overrides"], status=JobStatus.COMPLETED) for r in records]

    def _wait(self, pending: List[tuple], poll_s: float = 2.0, unknown_limit: int = 30) -> None:
        """Wait for every job, from the same evidence ``upbench status`` uses (results, submitit's result files,
        the scheduler), never from sacct alone (clusters without accounting have none); failures go to FAILED."""
        from upbench import jobs

        unknown: Dict[str, int] = {}
        while pending:
            still = []
            for record, job in pending:
                if self._EXECUTOR == "local" and not job.done():   # done() also reaps the finished process
                    still.append((record, job))
                    continue
                st = jobs.job_state(record)
                if st["state"] == "unknown":   # e.g. not yet visible to the scheduler's queries
                    unknown[record["job_id"]] = unknown.get(record["job_id"], 0) + 1
                if st["state"] in ("running", "pending") or (
                        st["state"] == "unknown" and unknown[record["job_id"]] <= unknown_limit):
                    still.append((record, job))
                    continue
                if st["state"] == "finished":
                    log.info(f"#{record['num']} {record['label']}: finished (job {record['job_id']})")
                else:
                    FAILED.append({"label": record["label"], "job_id": record["job_id"],
                                   "reason": f"{st['state']}: {st['detail']}", "log": record.get("stderr")})
                    log.error(f"#{record['num']} {record['label']}: job {record['job_id']} {st['state']}: "
                              f"{st['detail']} (log: {record.get('stderr')})")
            pending = still
            if pending:
                time.sleep(poll_s)


class UpbenchSlurmLauncher(UpbenchSubmititLauncher):
    _EXECUTOR = "slurm"


class UpbenchLocalLauncher(UpbenchSubmititLauncher):
    _EXECUTOR = "local"
