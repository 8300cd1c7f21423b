"""Command line: `python -m csdkit demo` and `python -m csdkit run ...` (also `csdkit ...`)."""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from csdkit.data import DATASETS
from csdkit.train import METHODS, PRESETS, Config, RunResult, prepare, preset, run

DEMO_METHODS = ["finetune", "lwf", "fd", "csd", "csd_official", "joint"]
DEMO_PAIRS = [("csd", "lwf"), ("csd", "fd"), ("csd_official", "lwf"), ("csd_official", "fd"),
              ("csd_official", "csd"), ("csd", "finetune"), ("lwf", "finetune"), ("fd", "lwf")]


def demo_config(dataset: str) -> Config:
    """The protocol the demo uses on each embedded dataset (see README, 'The demo')."""
    return preset("quick", dataset)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _demo_job(args: tuple[Config, str]) -> RunResult:
    cfg, method = args
    return run(cfg, method, quiet=True)


def reference_rows(cfg: Config, seeds: list[int]) -> list[dict]:
    """Two rows every reader should see: R@1 of raw pixels and of an untrained network, on the
    same test images as each seed's runs (the seed draws digits' train/test split)."""
    from csdkit.metrics import recall_at_k
    from csdkit.models import resnet
    from csdkit.train import extract

    rows = []
    for seed in seeds:
        data, split = prepare(cfg.replace(seed=seed))
        test = data.test
        first = test.of_classes(split.classes(0))
        raw = test.images.flatten(1).float()
        raw_first = first.images.flatten(1).float()
        rows.append({"method": "raw pixels", "seed": seed,
                     "final_R@1": recall_at_k(raw, test.labels),
                     "first_task_R@1": recall_at_k(raw_first, first.labels)})
        torch.manual_seed(seed)
        net = resnet(cfg.depth, data.n_classes)
        feats, _ = extract(net, test.images, data.mean, data.std)
        ffirst, _ = extract(net, first.images, data.mean, data.std)
        rows.append({"method": "untrained net", "seed": seed,
                     "final_R@1": recall_at_k(feats, test.labels),
                     "first_task_R@1": recall_at_k(ffirst, first.labels)})
    return rows


def demo(datasets: list[str], seeds: list[int], methods: list[str], out: Path, workers: int,
         quiet: bool, **overrides) -> None:
    from csdkit import report

    for dataset in datasets:
        cfg0 = demo_config(dataset).replace(**{k: v for k, v in overrides.items() if v})
        prepare(cfg0)  # builds and caches the data once, before workers start
        jobs = [(cfg0.replace(seed=s), m) for s in seeds for m in methods]
        start = time.perf_counter()
        # One thread per run, whatever the number of workers: on a CPU the reduction order of
        # the backward pass depends on the thread count, and so would the numbers.
        if workers > 1:
            with ProcessPoolExecutor(workers, initializer=_worker_init, initargs=(1,)) as pool:
                results = list(pool.map(_demo_job, jobs))
        else:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            results = [_demo_job(j) for j in jobs]
            torch.set_num_threads(threads)
        wall = time.perf_counter() - start
        rows = [report.run_row(r) for r in results] + reference_rows(cfg0, seeds)
        order = ["raw pixels", "untrained net", *methods]
        table = report.summary(rows, order)
        pairs = [p for p in DEMO_PAIRS if p[0] in methods and p[1] in methods]
        paired = pd.concat([report.paired_differences(rows, pairs, metric)
                            for metric in ("final_R@1", "first_task_R@1", "forgetting")])
        folder = out / dataset
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(
            {"config": cfg0.__dict__ | {"seed": seeds}, "runs": [r.to_json() for r in results],
             "rows": rows, "wall_seconds": wall}, indent=1, default=float))
        table.to_csv(folder / "summary.csv")
        paired.to_csv(folder / "paired.csv")
        report.plot_task_matrices(results, folder / "task_matrices.png")
        report.plot_recall_curves(results, folder / "recall_curves.png")
        print(f"\n== {dataset}: {cfg0.n_tasks} tasks, ResNet-{cfg0.depth}, {cfg0.epochs} epochs "
              f"a task, {len(seeds)} seeds; mean ± std over seeds ({wall:.0f} s wall, "
              f"{workers} worker(s))")
        print(table.to_string())
        print(f"\npaired per-seed differences (95% t-interval over seeds; beyond_noise = "
              f"the interval excludes 0):\n{paired.to_string()}")
        print(f"\nwrote {folder}/ (results.json, summary.csv, paired.csv, *.png)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csdkit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="every method over several seeds on the embedded data (CPU)",
                       description="Train every method over several seeds on the embedded "
                       "datasets; print mean ± std tables and paired differences; write "
                       "results.json, CSVs and figures under --out.")
    d.add_argument("--dataset", nargs="+", default=["digits", "glyphs"],
                   choices=["digits", "glyphs"], help="embedded dataset(s) (default: both)")
    d.add_argument("--seeds", type=int, default=5, help="number of seeds 0..N-1 (default 5)")
    d.add_argument("--methods", nargs="+", default=DEMO_METHODS, choices=list(METHODS))
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    d.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs in parallel, one thread each (default: 2, or 1 on one core); "
                   "the numbers do not depend on it")
    d.add_argument("--epochs", type=int, help="override the epochs per task (a quick look)")
    d.add_argument("--tasks", type=int, help="override the number of tasks")
    d.add_argument("--quiet", action="store_true", help="no progress bars")

    r = sub.add_parser("run", help="train one method on one dataset (real runs, GPU if present)",
                       description="Train one method task after task, evaluate after each task, "
                       "write a checkpoint per task and result.json under --out. An "
                       "interrupted run resumes from its last finished task.")
    r.add_argument("--preset", choices=list(PRESETS), default="quick",
                   help="quick: digits, seconds per task on a CPU; paper: the authors' "
                   "CIFAR-100 protocol (800 epochs a task)")
    r.add_argument("--method", choices=list(METHODS), default="csd")
    r.add_argument("--dataset", choices=DATASETS, help="overrides the preset's dataset")
    r.add_argument("--data-root", help="where datasets are downloaded/cached (default data/)")
    r.add_argument("--data-path", help="imagefolder: folder of class sub-folders")
    r.add_argument("--tasks", type=int, help="number of equal tasks")
    r.add_argument("--first-task", type=int, help="classes in the first task (with --increment)")
    r.add_argument("--increment", type=int, help="classes per later task")
    r.add_argument("--class-order", help="icarl (numpy seed 1993, the literature's), natural, "
                   "seed, or a comma-separated permutation")
    r.add_argument("--depth", type=int, help="ResNet depth 6n+2: 8, 14, 20, 32, 44, 56")
    r.add_argument("--epochs", type=int, help="epochs per task")
    r.add_argument("--batch-size", type=int)
    r.add_argument("--lr-first", type=float, help="learning rate of the first task")
    r.add_argument("--lr-later", type=float, help="learning rate of later tasks")
    r.add_argument("--seed", type=int)
    r.add_argument("--device", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    r.add_argument("--compile", action="store_true", help="CUDA: torch.compile the model")
    r.add_argument("--no-bf16", action="store_true", help="CUDA: train in fp32")
    r.add_argument("--out", type=Path, help="output folder (default runs/<dataset>-<method>-...)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _run_command(a: argparse.Namespace) -> None:
    cfg = preset(a.preset, a.dataset)
    changes = {
        "data_root": a.data_root, "data_path": a.data_path,
        "n_tasks": a.tasks, "first_task": a.first_task, "increment": a.increment,
        "depth": a.depth, "epochs": a.epochs, "batch_size": a.batch_size,
        "lr_first": a.lr_first, "lr_later": a.lr_later, "seed": a.seed, "device": a.device,
    }
    if a.class_order:
        order = a.class_order
        changes["class_order"] = [int(c) for c in order.split(",")] if "," in order else order
    changes = {k: v for k, v in changes.items() if v is not None}
    if a.first_task is not None and a.tasks is None:
        changes["n_tasks"] = None  # the task count follows from --first-task and --increment
    cfg = cfg.replace(**changes)
    cfg = cfg.replace(compile=a.compile, bf16=not a.no_bf16)
    out = a.out or Path("runs") / f"{cfg.dataset}-{a.method}-{a.preset}-seed{cfg.seed}"
    print(f"csdkit run: {a.method} on {cfg.dataset}, preset {a.preset}, output {out}")
    res = run(cfg, a.method, out_dir=out, quiet=a.quiet)
    R = np.asarray(res.recall, dtype=float)
    with np.printoptions(precision=3, suppress=True):
        print("R@1 task matrix (row: after task t, column: task j's classes):\n", R)
    print(f"final R@1 on all seen classes: {res.final_recall:.4f}   mAP: {res.seen_map[-1]:.4f}"
          f"   accuracy: {res.accuracy[-1]:.4f}   old-class accuracy: {res.old_accuracy[-1]:.4f}")
    print(f"wrote {out}/result.json and one checkpoint per task")


def main(argv: list[str] | None = None) -> None:
    a = _parser().parse_args(argv)
    try:
        if a.command == "demo":
            if a.seeds < 2:
                raise ValueError("demo needs --seeds >= 2 to report a spread over seeds")
            demo(a.dataset, list(range(a.seeds)), a.methods, a.out, max(1, a.workers), a.quiet,
                 epochs=a.epochs, n_tasks=a.tasks)
        else:
            _run_command(a)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # A user's mistake (bad option, missing data, another run's folder): say what and how
        # to fix it, without a traceback.
        raise SystemExit(f"csdkit: error: {err}") from err


if __name__ == "__main__":
    main()
