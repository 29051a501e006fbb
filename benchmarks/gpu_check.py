"""The prepared GPU check (issue 13): training speed, seconds per defense run at 1 and 4 workers per GPU, and the
survey grid's projected GPU-hours, in one command of under 12 minutes on one H100/H200.

(a) `train_speed.py`'s two loops, PreAct-ResNet18, bf16, batch 128: this project's images/s over the plain PyTorch
    reference's (best of its DataLoader worker counts), eager and with the backbone compiled ("reduce-overhead":
    CUDA graphs; `--compile` picks another mode or none).
(b) A BadNets PreAct-ResNet18 trained for a few epochs, then FT, ANP, SAU and NC at SPC 10 through the grid runner
    (`grid.py run`'s code, bf16) with 1 worker on the GPU (one run each), then 4 workers (four split seeds each):
    wall seconds per run, each run's `seconds` record, the GPU's peak memory (nvidia-smi, when there).
(c) The survey grid's (configs/grids/survey.yaml) GPU-hours projected from (a) and (b); the assumptions are printed.

Inputs are made on the spot: random images in CIFAR-10's shape and sizes (50,000 train, 10,000 test), as the
device machine takes no dataset; no method's cost depends on the pixels, except where a defense stops early.
`--jobs`, `--defenses` and `--no-speed` narrow it to a shorter re-check of (b). `--dry-run`: the same stages on
the CPU at toy sizes (SmallCNN, fp32, a few hundred images, the defenses' smoke arguments, 1 and 2 workers)
in about a minute; the tests run it.

    bash benchmarks/gpu_check.sh                 # on the GPU machine; writes $OUT (or runs/gpu_check)
    bash benchmarks/gpu_check.sh --dry-run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import get_args

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from datamodules.datasets import DATASETS
from experiments.grid import Grid
from experiments.runner import run_grid
from lightning_modules.defenses import DEFENSES
from lightning_modules.victim import CompileMode
from train_speed import project_throughput, random_cifar, reference_throughput

DEFENSES_TIMED = ["ft", "anp", "sau", "nc"]
TRAIN_IMAGES = {"cifar10": 50_000, "gtsrb": 39_209, "tiny_imagenet": 100_000}  # an attack epoch, for the projection


def pixel_cost(dataset: str) -> float:
    """Cost of one image relative to a 32x32 one (Tiny-ImageNet's 64x64: 4x)."""
    return (DATASETS[dataset].spec.image_size / 32) ** 2


class GpuMemory:
    """Peak `memory.used` of GPU 0 sampled by nvidia-smi every 200 ms while the block runs (None without it)."""

    def __enter__(self) -> GpuMemory:
        self.peak, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5, check=False).stdout
                self.peak = max(self.peak or 0, int(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.2)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def training_speed(cfg: SimpleNamespace, data_dir: str) -> dict:
    args = SimpleNamespace(backbone=cfg.backbone, steps=cfg.speed_steps, warmup=cfg.speed_warmup, device=cfg.device,
                           precision=cfg.precision)
    eager = project_throughput(args, data_dir, channels_last=True)
    compiled, compile_error = None, None
    if cfg.compile:
        try:  # a failing compiler (no triton, an unsupported op) must not cost the rest of the check
            compiled = project_throughput(args, data_dir, True, cfg.compile)
        except Exception as err:  # noqa: BLE001
            compile_error = f"{type(err).__name__}: {err}"[:2000]
            print(f"(a) compile_mode {cfg.compile} failed: {compile_error}", flush=True)
    refs = {w: reference_throughput(args, data_dir, w) for w in cfg.ref_workers}
    best = max(refs, key=refs.get)
    ours = max(eager, compiled or 0.0)  # what a grid would train at, with compile_mode set where it pays
    return {"project_img_s": ours, "project_eager_img_s": eager, "project_compiled_img_s": compiled,
            "compile_mode": cfg.compile, "compile_error": compile_error, "reference_img_s": refs,
            "ratio": ours / refs[best], "ratio_eager": eager / refs[best], "best_reference_workers": best}


def grid_file(work: Path, cfg: SimpleNamespace, data_dir: str, seeds: list[int], defenses: list[str]) -> Path:
    precision = ["--trainer.precision", cfg.precision]
    raw = {
        "name": "gpu_check", "runs_dir": str(work / "runs"), "data_dir": data_dir, "profile": "survey",
        "attacks": {"datasets": ["cifar10"], "attacks": ["badnets"], "backbones": [cfg.backbone],
                    "poison_ratios": [0.1], "seeds": [0],
                    "args": ["--trainer.max_epochs", str(cfg.attack_epochs), "--trainer.limit_val_batches", "0",
                             "--trainer.num_sanity_val_steps", "0", *precision, *cfg.attack_args,
                             # at 32 px the survey's BackdoorBench picture is this 3x3 square; no file to fetch
                             "--data.init_args.trigger",
                             '{"class_path": "datamodules.triggers.BadNets", "init_args": {"image": null}}']},
        "defenses": {"defenses": defenses, "spc": [10], "split_seeds": seeds or [0],
                     "args": ["--trainer.enable_model_summary", "false", *precision],
                     "per_defense_args": {d: cfg.defense_args(d) for d in defenses}},
    }
    path = work / f"grid-{len(defenses)}x{len(seeds)}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_stage(path: Path, devices: list[str], jobs: int) -> dict:
    grid = Grid.load(path)
    with GpuMemory() as memory:
        start = time.perf_counter()
        summary = run_grid(grid, devices=devices, jobs_per_device=jobs, progress=False)
        wall = time.perf_counter() - start
    if summary.get("failures"):
        raise SystemExit(f"gpu check: runs failed in {path.name}: {json.dumps(summary['failures'], indent=1)}")
    runs = [json.loads((grid.defense_dir(r) / "result.json").read_text()) for r in grid.defense_runs()]
    per_defense = {}
    for name in sorted({r["defense"] for r in runs}):
        mine = [r for r in runs if r["defense"] == name]
        per_defense[name] = {k: statistics.median(r["seconds"][k] for r in mine)
                             for k in ("load", "before", "method", "after", "total")}
        per_defense[name]["runs"] = len(mine)
    return {"jobs_per_device": jobs, "runs": len(runs), "wall_s": wall, "wall_per_run_s": wall / max(len(runs), 1),
            "per_defense_median_s": per_defense, "gpu_peak_mib": memory.peak,
            "before_sources": sorted({r["before_source"] for r in runs})}


def projection(speed: dict, stages: list[dict], survey: Path) -> dict:
    """GPU-hours of the survey grid if every attack trains at (a)'s images/s and every defense run costs what the
    best stage's runs cost per run of wall time, both scaled by the dataset's images and pixels per image."""
    grid = Grid.load(survey)
    attacks = grid.attack_runs()
    epochs = int(grid.attacks["args"][grid.attacks["args"].index("--trainer.max_epochs") + 1])
    attack_s = sum(epochs * TRAIN_IMAGES[a.dataset] * pixel_cost(a.dataset) for a in attacks) \
        / speed["project_img_s"]
    best = min(stages, key=lambda s: s["wall_per_run_s"])
    counts: dict[str, int] = {}
    for run in grid.defense_runs(attacks):
        counts[run.attack.dataset] = counts.get(run.attack.dataset, 0) + 1
    defense_s = sum(n * pixel_cost(d) * best["wall_per_run_s"] for d, n in counts.items())
    return {"attacked_models": len(attacks), "defense_runs": sum(counts.values()), "attack_epochs": epochs,
            "attack_gpu_hours": attack_s / 3600, "defense_gpu_hours": defense_s / 3600,
            "total_gpu_hours": attack_s / 3600 + defense_s / 3600, "jobs_per_device": best["jobs_per_device"],
            "assumes": "every backbone trains at PreAct-ResNet18's images/s; every defense run (16 defenses, SPC 2, "
                       "10, 100) costs the mean wall seconds per run of FT, ANP, SAU, NC at SPC 10; Tiny-ImageNet "
                       "costs 4x per image (64x64 pixels)"}


def config(dry_run: bool) -> SimpleNamespace:
    if dry_run:
        return SimpleNamespace(
            device="cpu", devices=["cpu"], jobs=[1, 2], precision="32-true", backbone="small_cnn",
            train=512, test=256, speed_steps=4, speed_warmup=1, ref_workers=[0], attack_epochs=1, compile=None,
            attack_args=["--model.init_args.backbone.init_args.width", "8"],
            defense_args=lambda d: list(DEFENSES.meta(d)["smoke_args"]))
    return SimpleNamespace(
        device="cuda", devices=["0"], jobs=[1, 4], precision="bf16-mixed", backbone="preact_resnet18",
        train=50_000, test=10_000, speed_steps=300, speed_warmup=50, ref_workers=[4, 8, 12], attack_epochs=3,
        compile="reduce-overhead",
        attack_args=[], defense_args=lambda d: [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (what the tests run)")
    parser.add_argument("--out", default="runs/gpu_check", help="folder for the runs and gpu_check.json")
    parser.add_argument("--jobs", type=int, nargs="+", default=None,
                        help="workers per GPU of the stages (default 1 4; dry run 1 2)")
    parser.add_argument("--defenses", nargs="+", default=DEFENSES_TIMED, choices=sorted(DEFENSES),
                        help="the defenses timed (default: ft anp sau nc)")
    parser.add_argument("--no-speed", action="store_true", help="skip (a) and with it (c): a shorter re-check of (b)")
    parser.add_argument("--compile", default=None, choices=[*get_args(CompileMode), "none"],
                        help="(a)'s compiled run: a torch.compile mode or none (default reduce-overhead; dry run none)")
    args = parser.parse_args()
    cfg = config(args.dry_run)
    cfg.jobs = args.jobs or cfg.jobs
    if args.compile is not None:
        cfg.compile = None if args.compile == "none" else args.compile
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu check: no CUDA device here; use --dry-run for the CPU version")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = random_cifar(out / "data", cfg.train, cfg.test)
    report = {"machine": {"gpu": torch.cuda.get_device_name() if cfg.device == "cuda" else None,
                          "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "dry_run": args.dry_run}}
    print(json.dumps(report["machine"]), flush=True)

    if not args.no_speed:
        start = time.perf_counter()
        speed = report["training_speed"] = training_speed(cfg, data_dir)
        compiled = (f", compiled ({speed['compile_mode']}) {speed['project_compiled_img_s']:.0f} img/s"
                    if speed["project_compiled_img_s"] else "")
        print(f"(a) {cfg.backbone} {cfg.precision}: project {speed['project_eager_img_s']:.0f} img/s{compiled}, "
              f"reference {speed['reference_img_s']} -> {speed['ratio_eager']:.2f}x eager, {speed['ratio']:.2f}x best "
              f"({time.perf_counter() - start:.0f} s)", flush=True)

    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))

    start = time.perf_counter()
    run_stage(grid_file(out, cfg, data_dir, [], []), cfg.devices, 1)  # the attacked model only
    report["attack_s"] = time.perf_counter() - start
    print(f"(b) attacked model: {report['attack_s']:.0f} s", flush=True)
    report["stages"], first_seed = [], 0
    for jobs in cfg.jobs:  # `jobs` split seeds per defense: each worker gets one run of each defense
        seeds = list(range(first_seed, first_seed + jobs))
        first_seed += jobs
        stage = run_stage(grid_file(out, cfg, data_dir, seeds, args.defenses), cfg.devices, jobs)
        report["stages"].append(stage)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        print(f"(b) {jobs} worker(s): {stage['runs']} runs in {stage['wall_s']:.0f} s = "
              f"{stage['wall_per_run_s']:.1f} s per run; peak GPU memory {stage['gpu_peak_mib']} MiB; medians "
              + ", ".join(f"{d} {v['total']:.1f} s (method {v['method']:.1f})"
                          for d, v in stage["per_defense_median_s"].items()), flush=True)

    if args.no_speed:
        return
    report["projection"] = projection(report["training_speed"], report["stages"],
                                      Path(__file__).resolve().parents[1] / "configs" / "grids" / "survey.yaml")
    p = report["projection"]
    print(f"(c) survey grid: {p['attacked_models']} attacked models ({p['attack_gpu_hours']:.0f} GPU-h) + "
          f"{p['defense_runs']} defense runs at {p['jobs_per_device']} worker(s) per GPU "
          f"({p['defense_gpu_hours']:.0f} GPU-h) = {p['total_gpu_hours']:.0f} GPU-hours; assumes {p['assumes']}")
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
