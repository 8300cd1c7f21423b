"""Command line: `python -m csdkit demo` and `python -m csdkit run ...` (also `csdkit ...`)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from csdkit import train
from csdkit.course import METHODS as COURSE_METHODS
from csdkit.data import DATASETS
from csdkit.runs import cache_folder, machine, run_id, run_identity, run_name, write_json
from csdkit.train import METHODS, PRESETS, precision, prepare, preset, resolve_device, run

QUICK_LOOK = ["finetune", "fd", "csd"]  # the default demo: about 2 minutes on 2 cores
FULL = [*COURSE_METHODS, "bct", "simplex"]  # --full: every method notebooks 03-08 train
DEMO_PAIRS = [("fd", "finetune"), ("lwf", "finetune"), ("csd", "finetune"),
              ("csd_official", "finetune"), ("csd", "lwf"), ("csd", "fd"), ("csd_official", "fd"),
              ("csd_official", "csd")]
DEMO_METRICS = ("task_avg_R@1", "first_task_R@1")
#: `csdkit run`'s options that override a Config field: --flag: (field, type, help).
METHODS_HELP = f"one of {', '.join(METHODS)}, or simplex/bct joined to one with + (simplex+fd)"
RUN_OPTIONS = {
    "data-root": ("data_root", str, "where datasets are downloaded/cached (default data/)"),
    "data-path": ("data_path", str, "imagefolder: folder of class sub-folders"),
    "tasks": ("n_tasks", int, "number of equal tasks"),
    "first-task": ("first_task", int, "classes in the first task (with --increment)"),
    "increment": ("increment", int, "classes per later task"),
    "depth": ("depth", int, "ResNet depth 6n+2: 8, 14, 20, 32, 44, 56"),
    "epochs": ("epochs", int, "epochs per task"),
    "batch-size": ("batch_size", int, None),
    "lr-first": ("lr_first", float, "learning rate of the first task"),
    "lr-later": ("lr_later", float, "learning rate of later tasks"),
    "w-fd": ("w_fd", float, "weight of feature distillation (methods with fd)"),
    "w-csd": ("w_csd", float, "weight of the CSD loss (methods with csd)"),
    "w-bct": ("w_bct", float, "weight of BCT's influence loss (methods with bct)"),
    "seed": ("seed", int, None),
    "device": ("device", str, "auto (CUDA if present), cpu, cuda, cuda:1 ..."),
}


def demo(preset_name: str, seeds: list[int], methods: list[str], out: Path, workers: int,
         cache: Path = Path("runs/cache"), **overrides) -> Path:
    """Train `methods` over `seeds` with a preset, print mean ± std tables and paired
    differences, and write them under out/<preset>-<dataset>-<id>/ (id: configuration, seeds,
    methods, torch and machine: nothing else overwrites them); runs are cached in `cache`,
    shared with the notebooks. Returns the results folder."""
    from csdkit import report

    [train.method_terms(m) for m in methods]  # an unknown method fails before anything trains
    cfg = preset(preset_name).replace(**{k: v for k, v in overrides.items() if v is not None})
    cfg.check()
    data = prepare(cfg.replace(seed=seeds[0]))  # also builds and caches the data once
    device = resolve_device(cfg.device)
    cache = cache_folder(cache, device)  # its name holds the torch release and the machine
    what = {"cache": cache.name, "seeds": seeds,
            "runs": run_identity(cfg, "+".join(methods), data[0])}
    folder = out / f"{preset_name}-{cfg.dataset}-{run_id(what)}"
    print(f"demo: {', '.join(methods)} on {cfg.dataset} ({cfg.n_tasks} tasks, ResNet-"
          f"{cfg.depth}, {cfg.epochs_first or cfg.epochs} epochs on the first task, {cfg.epochs} "
          f"on each later one), seeds {seeds}: {len(methods) * len(seeds)} "
          f"runs, {workers} at a time, one thread each", flush=True)
    start = time.perf_counter()
    results, rows = report.compare(cfg, {m: (m, {}) for m in methods}, seeds, cache, workers)
    wall = time.perf_counter() - start
    rows += report.reference_rows(cfg, seeds)
    table = report.summary(rows, ["raw pixels", "untrained net", *methods])
    pairs = [p for p in DEMO_PAIRS if p[0] in methods and p[1] in methods]
    family = len(pairs) * len(DEMO_METRICS)
    paired = pd.concat([report.paired_differences(rows, pairs, metric, family=family)
                        for metric in DEMO_METRICS])
    write_json(folder / "results.json", {
        "preset": preset_name, "config": {k: str(v) for k, v in vars(cfg).items()},
        "seeds": seeds, "methods": methods, "runs": [r.to_json() for r in results],
        "rows": rows, "wall_seconds": wall, "workers": workers})
    table.to_csv(folder / "summary.csv")
    paired.to_csv(folder / "paired.csv")
    report.plot_task_matrices(results, folder / "task_matrices.png")
    report.plot_recall_curves(results, folder / "recall_curves.png", references=rows)
    print(f"\n== {cfg.dataset}, preset {preset_name}: mean ± std over {len(seeds)} seeds "
          f"({wall:.0f} s wall; runs found in the cache count 0 s)")
    print(table.to_string())
    print(f"\npaired per-seed differences, 95% t-interval over seeds; beyond_noise: it "
          f"excludes 0; beyond_noise_all: it still does when corrected for all {family} "
          f"intervals shown (Bonferroni):\n{paired.to_string()}")
    print(f"\nwrote {folder}/ (results.json, summary.csv, paired.csv, *.png)")
    return folder


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csdkit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="compare methods over seeds on the embedded data (CPU)",
                       description="Train methods over seeds with a preset; print mean ± std "
                       "tables and paired differences; write results.json, CSVs and figures "
                       "under --out. Default: the course protocol, 3 seeds, fine-tuning, FD and "
                       "CSD. --full: 5 seeds and every method, joint training included.")
    d.add_argument("--full", action="store_true", help="5 seeds, every method (default "
                   "seeds/methods change to these; --seeds/--methods still win)")
    d.add_argument("--preset", choices=["course", "quick"], default="course",
                   help="course: glyphs, where forgetting shows (default); quick: digits, "
                   "the fastest")
    d.add_argument("--seeds", type=int, help="number of seeds 0..N-1 (default 3, --full 5)")
    d.add_argument("--methods", nargs="+",
                   help=f"{METHODS_HELP}; default {' '.join(QUICK_LOOK)}; --full: {' '.join(FULL)}")
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="where the tables and "
                   "figures go (default runs/demo)")
    d.add_argument("--cache", type=Path, default=Path("runs/cache"), help="the run cache, "
                   "shared with the notebooks (default runs/cache)")
    d.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs in parallel, one thread each (default: 2, or 1 on one core); "
                   "the numbers do not depend on it")
    d.add_argument("--epochs", type=int, help="override the epochs per task")
    d.add_argument("--tasks", type=int, help="override the number of tasks")

    r = sub.add_parser("run", help="train one method on one dataset (real runs, GPU if present)",
                       description="Train one method task after task, evaluate after each, "
                       "write a checkpoint per task and result.json; resumes when interrupted.")
    r.add_argument("--preset", choices=list(PRESETS), default="quick",
                   help="quick: digits, seconds a task on a CPU; course: glyphs, the notebooks' "
                   "protocol; paper: the authors' CIFAR-100 protocol (800 epochs a task); "
                   "paper-short: the same 16 times shorter (50 epochs a task)")
    r.add_argument("--method", default="csd", help=f"{METHODS_HELP} (default csd)")
    r.add_argument("--dataset", choices=DATASETS, help="overrides the preset's dataset")
    for flag, (_, kind, text) in RUN_OPTIONS.items():
        r.add_argument(f"--{flag}", type=kind, help=text)
    r.add_argument("--class-order", help="natural (0..n-1, the authors'), icarl (numpy seed "
                   "1993), seed, or a comma-separated permutation")
    r.add_argument("--compile", action="store_true", help="CUDA: torch.compile the model")
    r.add_argument("--no-bf16", action="store_true", help="CUDA: train in fp32 (bf16 autocast "
                   "is the default on GPUs with native bf16, Ampere or newer)")
    r.add_argument("--resume-anywhere", action="store_true", help="resume checkpoints written "
                   "on another machine or in another precision (their numbers would mix)")
    r.add_argument("--out", type=Path, help="output folder (default runs/<dataset>-<method>-"
                   "<preset>-seed<seed>-<8 hex digits of the run's identity>)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _run_command(a: argparse.Namespace) -> None:
    train.method_terms(a.method)  # an unknown method fails before any data are loaded
    cfg = preset(a.preset, a.dataset)
    changes = {field: getattr(a, flag.replace("-", "_")) for flag, (field, _, _) in
               RUN_OPTIONS.items()}
    if a.class_order:
        order = a.class_order
        changes["class_order"] = [int(c) for c in order.split(",")] if "," in order else order
    changes = {k: v for k, v in changes.items() if v is not None}
    if (a.first_task is not None or a.increment is not None) and a.tasks is None:
        changes["n_tasks"] = None  # the task count follows from --first-task and --increment
    cfg = cfg.replace(**changes, compile=a.compile, bf16=not a.no_bf16)
    cfg.check()
    data = prepare(cfg)
    # The default folder ends in the hash of the run's identity (config, method, data): another
    # option, seed or data folder gets another folder, never another run's checkpoints.
    out = a.out or Path("runs") / run_name(cfg, a.method, data[0])
    device = resolve_device(cfg.device)
    print(f"csdkit run: {a.method} on {cfg.dataset}, preset {a.preset}, on {machine(device)} in "
          f"{precision(cfg, device)}, output {out}")
    res = run(cfg, a.method, out_dir=out, quiet=a.quiet, data=data,
              resume_anywhere=a.resume_anywhere)
    s = res.to_json()
    with np.printoptions(precision=3, suppress=True):
        print("R@1 task matrix (row: after task t, column: within task j's classes):\n",
              np.asarray(res.recall, dtype=float), "\ncompatibility matrix on task 1's test "
              "images (row: query model after task i, column: gallery model after task j):\n",
              np.asarray(res.compatibility))
    print(f"the paper's Average (mean over tasks of R@1 within each task): {s['task_avg_R@1']:.4f}"
          f"\nR@1 pooled over all seen classes: {s['pooled_R@1']:.4f}   mAP: {res.seen_map[-1]:.4f}"
          f"   accuracy: {res.accuracy[-1]:.4f}   old-class accuracy: {res.old_accuracy[-1]:.4f}"
          f"\nAC (share of updates that are compatible, a tie counts): {s['AC']:.3f}   AM (mean "
          f"of the compatibility matrix's lower triangle): {s['AM']:.3f}")
    print(f"wrote {out}/result.json and one checkpoint per task")


def main(argv: list[str] | None = None) -> None:
    a = _parser().parse_args(argv)
    try:
        if a.command == "demo":
            seeds = a.seeds or (5 if a.full else 3)
            if seeds < 2:
                raise ValueError("demo needs --seeds >= 2 to report a spread over seeds")
            demo(a.preset, list(range(seeds)), a.methods or (FULL if a.full else QUICK_LOOK),
                 a.out, max(1, a.workers), a.cache, epochs=a.epochs, n_tasks=a.tasks)
        else:
            _run_command(a)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        # A user's mistake or a diverged run: say what and how to fix it, without a traceback.
        # Anything else is a bug and keeps its traceback.
        raise SystemExit(f"csdkit: error: {err}") from err
    except torch.cuda.OutOfMemoryError as err:  # a RuntimeError subclass, in every torch >= 2.2
        raise SystemExit(
            "csdkit: error: the device ran out of memory. Use a smaller --batch-size (or "
            "--depth), or --device cpu; nothing of the unfinished task was saved."
        ) from err


if __name__ == "__main__":
    main()
