"""The later-task learning rate (and epochs) against forgetting and learning, on TEST fonts.

A measurement, not a choice: no setting is selected here (benchmarks/tune.py plasticity chooses
on validation fonts). For every (rate, later-task epochs, method) it trains the course protocol
(glyphs, 12 px, 5 tasks of 8 letters, first task 12 epochs at 1e-3) on the given seeds and
reports, mean ± std over the seeds:

    first-task drop   R@1 within task 1 after task 1 minus after task 5
    new-task R@1      R@1 within task t right after training it, tasks 2-5 (plasticity)
    Average           the paper's Average after task 5
    pooled R@1        R@1 over all 40 letters after task 5

    python benchmarks/sweep_rates.py --out benchmarks/results/sweep-rates-course.json
    python benchmarks/sweep_rates.py --lr-later 1e-3 --epochs 36 --out /tmp/x.json
    python benchmarks/sweep_rates.py --tasks 2 --epochs 36 --lr-later 3e-4 1e-3 1e-2 \
        --methods finetune fd csd csd_official --seeds $(seq 100 119) --out ...  # notebook 09's

--tasks 2 stops every run after task 2 (the first update only, as notebook 09 sweeps it): then
"tasks 2-5" above read "task 2", "after task 5" reads "after task 2", pooled is over 16 letters.

Runs are cached (runs/cache/, shared with the notebooks); results files are never overwritten.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from csdkit.runs import cache_folder, machine, refuse_existing, run_grid, write_json  # noqa: E402
from csdkit.train import RunResult, preset  # noqa: E402


def scores(r: RunResult) -> dict:
    R = np.asarray(r.recall, dtype=float)[:, : len(r.recall)]  # the tasks trained
    return {"first_drop": R[0, 0] - R[-1, 0], "new_task": float(np.mean(np.diag(R)[1:])),
            "task_avg": r.task_average_recall, "pooled": r.final_recall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lr-later", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2])
    p.add_argument("--epochs", type=int, nargs="+", default=[12], help="later-task epochs")
    p.add_argument("--methods", nargs="+", default=["finetune", "fd", "csd_official"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--tasks", type=int, default=None, help="stop after this many tasks")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path("runs/cache"))
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    out = refuse_existing(a.out)
    torch.set_num_threads(1)
    base = preset("course")  # later tasks at `epochs`, the first always at 12
    keys = list(itertools.product(a.epochs, a.lr_later, a.methods, a.seeds))
    start = time.perf_counter()
    results = run_grid([(base.replace(epochs=ep, epochs_first=None if ep == 12 else 12,
                                      lr_later=lr, seed=s), m)
                        for ep, lr, m, s in keys], cache_folder(a.cache, torch.device("cpu")),
                       a.workers, last_task=None if a.tasks is None else a.tasks - 1)
    rows = [{"epochs": ep, "lr_later": lr, "method": m, "seed": s, **scores(r)}
            for (ep, lr, m, s), r in zip(keys, results, strict=True)]
    print(f"{'epochs':>6} {'lr_later':>8} {'method':>13}  first-task drop   new-task R@1"
          f"      Average      pooled R@1   ({len(a.seeds)} seeds, test fonts)")
    for ep, lr, m in itertools.product(a.epochs, a.lr_later, a.methods):
        sel = [r for r in rows if (r["epochs"], r["lr_later"], r["method"]) == (ep, lr, m)]
        cells = [f"{np.mean([r[k] for r in sel]):6.3f} ± {np.std([r[k] for r in sel], ddof=1):.3f}"
                 for k in ("first_drop", "new_task", "task_avg", "pooled")]
        print(f"{ep:>6} {lr:>8g} {m:>13}  " + "   ".join(cells))
    write_json(out, {"base": {k: str(v) for k, v in vars(base).items()}, "tasks": a.tasks,
                     "rows": rows,
                     "wall_seconds": time.perf_counter() - start, "torch": torch.__version__,
                     "machine": machine(torch.device("cpu")), "workers": a.workers})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
