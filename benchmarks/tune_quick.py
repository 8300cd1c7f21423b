"""Choose the `quick` protocol on VALIDATION data only (never test).

Grid over the later tasks' learning rate and the epochs per task; each setting trains FT, LwF,
FD and CSD on tuning seeds that the reported comparison does not use (100, 101), and is scored by
the validation R@1 over all classes after the last task, averaged over methods and seeds.

    python benchmarks/tune_quick.py --dataset digits      # writes benchmarks/results/tune_<d>.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from csdkit.cli import demo_config
from csdkit.train import prepare, run

METHODS = ["finetune", "lwf", "fd", "csd"]


def job(args):
    cfg, method = args
    torch.set_num_threads(1)
    r = run(cfg, method, quiet=True)
    return {"lr_later": cfg.lr_later, "epochs": cfg.epochs, "seed": cfg.seed, "method": method,
            "val_final": r.val_recall[-1], "seconds": sum(r.seconds)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="digits")
    p.add_argument("--lr-later", type=float, nargs="+", default=[1e-3, 3e-4, 1e-4])
    p.add_argument("--epochs", type=int, nargs="+", default=[10, 20])
    p.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    base = demo_config(a.dataset)
    prepare(base)  # build/cache the data before the workers start
    jobs = [(base.replace(lr_later=lr, epochs=ep, seed=s), m)
            for lr, ep in itertools.product(a.lr_later, a.epochs) for s in a.seeds for m in METHODS]
    start = time.perf_counter()
    with ProcessPoolExecutor(a.workers) as pool:
        rows = list(pool.map(job, jobs))
    scores = {}
    for lr, ep in itertools.product(a.lr_later, a.epochs):
        v = [r["val_final"] for r in rows if r["lr_later"] == lr and r["epochs"] == ep]
        scores[f"lr_later={lr:g} epochs={ep}"] = float(np.mean(v))
    best = max(scores, key=scores.get)
    for k, v in scores.items():
        print(f"{k:28s} validation R@1 {v:.4f}" + ("   <- chosen" if k == best else ""))
    out = Path(__file__).parent / "results" / f"tune_{a.dataset}.json"
    out.write_text(json.dumps({"base": base.__dict__, "scores": scores, "chosen": best,
                               "rows": rows, "wall_seconds": time.perf_counter() - start},
                              indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
