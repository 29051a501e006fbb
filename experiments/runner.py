"""Run a grid: attacked models once each, then every defense run on them, in parallel worker processes.

Idempotent and resumable: a run is finished when its marker exists (attack.json for an attacked model,
result.json for a defense run: records of datamodules/record.py, written atomically, last). Anything else in a run
folder is a run that was interrupted: the folder is cleared and the run redone, unless another runner or sweep
agent is running it (a flock on `.<run>.lock` beside the folder, held for the whole run): then it is left to that
process. Workers are spawned processes that each import torch once and run many LightningCLI invocations, one
device each (`--devices 0,1` for GPUs, `cpu` by default); they die with the runner (PR_SET_PDEATHSIG), so a killed
runner leaves no orphan writing into the tree.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
import traceback
import warnings
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamodules.record import attack_result, load_checkpoint, training_seed, write_json
from experiments.grid import AttackRun, DefenseRun, Grid

ATTACK_DONE, DEFENSE_DONE = "attack.json", "result.json"
_WORKER_DEVICE = "cpu"


@dataclass(frozen=True)
class Job:
    kind: str  # "attack" or "defense"
    key: str
    run_dir: str
    argv: tuple[str, ...]
    fields: dict[str, Any]
    needs: tuple[str, ...] = ()  # run folders of other attacked models it reads (the retuning's clean model)


def read_marker(run_dir: Path, kind: str) -> dict[str, Any] | None:
    path = run_dir / (ATTACK_DONE if kind == "attack" else DEFENSE_DONE)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def logger_args(run_dir: Path, key: str, group: str, job_type: str, wandb_project: str | None,
                fields: dict[str, Any] | None = None) -> list[str]:
    loggers: list[dict[str, Any]] = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                      "init_args": {"save_dir": str(run_dir), "name": "", "version": ""}}]
    if wandb_project:
        loggers.append({"class_path": "lightning.pytorch.loggers.WandbLogger",
                        "init_args": {"project": wandb_project, "save_dir": str(run_dir), "name": key,
                                      "group": group, "job_type": job_type},
                        "dict_kwargs": {"config": {"grid": fields or {}, "run_key": key}}})
    return ["--trainer.logger", json.dumps(loggers), "--trainer.enable_progress_bar", "false"]


def attack_job(grid: Grid, run: AttackRun, wandb_project: str | None = None) -> Job:
    run_dir = grid.attack_dir(run)
    argv = ("fit", *run.args, *logger_args(run_dir, run.key, run.key, "attack", wandb_project, run.fields()))
    return Job("attack", run.key, str(run_dir), argv, run.fields())


def defense_job(grid: Grid, run: DefenseRun, wandb_project: str | None = None) -> Job:
    run_dir = grid.defense_dir(run)
    argv = ("fit", *run.args, "--model.backdoored", str(grid.attack_checkpoint(run.attack)),
            "--model.result_file", str(run_dir / DEFENSE_DONE),
            *logger_args(run_dir, f"{run.attack.key}/{run.key}", run.attack.key, "defense", wandb_project,
                         run.fields()))
    return Job("defense", f"{run.attack.key}/{run.key}", str(run_dir), argv, run.fields(),
               tuple(str(grid.attack_dir(a)) for a in run.needs))


# -- inside a worker process --------------------------------------------------------------------------------
def _init_worker(devices: Any, threads: int) -> None:
    global _WORKER_DEVICE
    if sys.platform.startswith("linux"):  # die with the runner
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    _WORKER_DEVICE = devices.get()
    if _WORKER_DEVICE != "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = _WORKER_DEVICE
    import torch

    torch.set_num_threads(threads)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[bool]:
    """Hold an exclusive lock on `<parent>/.<run>.lock` for the whole run; yields False (and holds nothing) when
    another process holds it. The kernel drops a flock when its process ends, however it ends, so the lock of a
    killed runner is free again at once: the lock file itself means nothing."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f".{run_dir.name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def execute(job: Job) -> dict[str, Any]:
    """Run one job in this process, under its run lock; returns {"status": "done" | "failed" | "busy", ...}
    ("busy": another runner or agent is running it now, and its folder was left alone)."""
    run_dir = Path(job.run_dir)
    if read_marker(run_dir, job.kind) is not None:
        return {"status": "done", "skipped": True}
    with run_lock(run_dir) as mine:
        if not mine:
            return {"status": "busy"}
        if read_marker(run_dir, job.kind) is not None:  # finished by another process since the check above
            return {"status": "done", "skipped": True}
        return _execute(job, run_dir)


def _execute(job: Job, run_dir: Path) -> dict[str, Any]:
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted earlier attempt
    run_dir.mkdir(parents=True)
    # the run's names in the grid and its arguments; what it was is in its record (attack.json, result.json)
    write_json(run_dir / "run.json", {"kind": job.kind, "key": job.key, "fields": job.fields, "argv": list(job.argv)})
    device_args = ["--trainer.accelerator", "cpu"] if _WORKER_DEVICE == "cpu" else \
        ["--trainer.accelerator", "gpu", "--trainer.devices", "1"]
    start = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log, redirect_fds(log.fileno()):
        try:
            from lightning_modules.cli import BackdoorCLI

            argv, sys.argv = sys.argv, [sys.argv[0]]  # LightningCLI warns when argv and args both hold arguments
            try:
                with warnings.catch_warnings():
                    # the CSV logger writes into the run's folder, which holds run.json and log.txt from above
                    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
                    cli = BackdoorCLI(args=[*job.argv, *device_args])
            finally:
                sys.argv = argv
                finish_wandb()  # a worker runs many runs: the next one must not log into this one's W&B run
            if job.kind == "attack":
                metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
                seconds, checkpoint = time.perf_counter() - start, run_dir / "checkpoints" / "last.ckpt"
                if not checkpoint.exists():
                    raise RuntimeError(f"attack run finished without {checkpoint}")
                write_json(run_dir / ATTACK_DONE, attack_result(job.key, load_checkpoint(checkpoint, mmap=True),
                                                                training_seed(), metrics, seconds, checkpoint))
            elif read_marker(run_dir, "defense") is None:
                raise RuntimeError(f"defense run finished without writing {run_dir}/{DEFENSE_DONE}")
        except BaseException as err:  # noqa: BLE001 - any failure is recorded and the grid goes on
            (run_dir / "error.txt").write_text(traceback.format_exc())
            return {"status": "failed", "error": f"{type(err).__name__}: {err}"}
    return {"status": "done"}


def finish_wandb() -> None:
    """End the process's W&B run, if one is open (its records are then complete on disk, also offline)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


class redirect_fds:
    """Send this process's stdout and stderr (file descriptors 1 and 2, C-level output too) to `fd`."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = (os.dup(1), os.dup(2))
        os.dup2(self.fd, 1)
        os.dup2(self.fd, 2)

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        os.close(self.saved[0])
        os.close(self.saved[1])


# -- the runner ---------------------------------------------------------------------------------------------
def run_grid(
    grid: Grid,
    devices: list[str] | None = None,
    jobs_per_device: int = 1,
    wandb_project: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every unfinished run of the grid; returns counts and the failures."""
    from tqdm import tqdm

    devices = devices or ["cpu"]
    attacks = grid.attack_runs()
    defenses = grid.defense_runs(attacks)
    by_attack: dict[str, list[DefenseRun]] = defaultdict(list)
    for d in defenses:
        by_attack[d.attack.key].append(d)
    workers = len(devices) * jobs_per_device
    threads = max(1, (os.cpu_count() or 1) // workers) if devices == ["cpu"] * len(devices) else 4
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # the user's choice, e.g. to leave cores to other work
        threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    for device in devices:
        for _ in range(jobs_per_device):
            queue.put(device)
    bar = tqdm(total=len(attacks) + len(defenses), desc=grid.name, unit="run", disable=not progress)
    failures: list[dict[str, Any]] = []
    busy: list[str] = []  # runs another runner or agent holds
    futures: dict[Any, Job] = {}
    executor = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(queue, threads))

    waiting: list[Job] = []  # defense runs whose other attacked models (`needs`) are not trained yet

    def submit(job: Job) -> None:
        if any(read_marker(Path(n), "attack") is None for n in job.needs):
            waiting.append(job)
        elif read_marker(Path(job.run_dir), job.kind) is not None:
            bar.update(1)
            if job.kind == "attack":
                for d in by_attack[job.key]:
                    submit(defense_job(grid, d, wandb_project))
        else:
            futures[executor.submit(execute, job)] = job

    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for run in attacks:
            submit(attack_job(grid, run, wandb_project))
        while futures:
            finished, _ = wait(list(futures), return_when=FIRST_COMPLETED)
            for future in finished:
                job = futures.pop(future)
                outcome = future.result()
                bar.update(1)
                if outcome["status"] in ("failed", "busy"):
                    if outcome["status"] == "failed":
                        failures.append({"key": job.key, "kind": job.kind, "error": outcome["error"],
                                         "log": str(Path(job.run_dir) / "error.txt")})
                    else:
                        busy.append(job.key)
                    if job.kind == "attack":  # its defense runs cannot start, nor those that need it
                        blocked = [w for w in waiting if job.run_dir in w.needs]
                        for w in blocked:
                            waiting.remove(w)
                            if outcome["status"] == "busy":
                                busy.append(w.key)
                            else:
                                failures.append({"key": w.key, "kind": w.kind, "error": f"needs {job.key}, which failed",
                                                 "log": str(Path(job.run_dir) / "error.txt")})
                        bar.update(len(by_attack[job.key]) + len(blocked))
                elif job.kind == "attack":
                    for d in by_attack[job.key]:
                        submit(defense_job(grid, d, wandb_project))
                    for ready in [w for w in waiting if job.run_dir in w.needs]:
                        waiting.remove(ready)
                        submit(ready)
        busy.extend(w.key for w in waiting)  # their other attacked model is another runner's and not done yet
    except KeyboardInterrupt:
        # stop the runs in flight now: an interrupted run is redone next time, nothing finished is touched
        for process in list(getattr(executor, "_processes", {}).values()):
            process.kill()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return {"attacks": len(attacks), "defenses": len(defenses), "failures": failures, "busy": busy}


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
