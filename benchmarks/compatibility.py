"""Compatibility of every method on held-out seeds: the table notebook 08 will be built on.

    python benchmarks/compatibility.py --seeds 100 120 \
        --out benchmarks/results/compatibility-heldout.json

Course protocol, task 1's test images (the matrix every run stores, `RunResult.compatibility`).
Per method, mean ± sd over the seeds: AC, AM, the mean diagonal (each model in its own gallery),
the mean below the diagonal, the final model searching the first model's gallery, the final model
in its own gallery (task 1), pooled R@1; then each method minus fine-tuning, paired by seed,
with a 95% t interval.
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from csdkit import course, metrics
from csdkit.report import t_interval
from csdkit.runs import machine, write_json

METHODS = ["finetune", "fd", "csd_official", "bct", "simplex"]


def rows(
    c: course.Course, method: str, seeds: tuple[int, ...], results: list
) -> dict[str, list[float]]:
    cols = {
        k: []
        for k in [
            "AC",
            "AM",
            "diagonal",
            "below_diagonal",
            "final_in_first_gallery",
            "final_in_own_gallery",
            "pooled",
        ]
    }
    for seed, result in zip(seeds, results, strict=True):
        matrix = np.array(result.compatibility, dtype=float)
        facts = c.facts(method, seed)
        cols["AC"].append(metrics.average_compatibility(matrix))
        cols["AM"].append(metrics.average_multimodel_accuracy(matrix))
        cols["diagonal"].append(float(np.diag(matrix).mean()))
        cols["below_diagonal"].append(float(matrix[np.tril_indices(len(matrix), -1)].mean()))
        cols["final_in_first_gallery"].append(facts["old_gallery_R1"])
        cols["final_in_own_gallery"].append(facts["first_task_final"])
        cols["pooled"].append(facts["pooled"])
    return cols


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs=2, default=(100, 120), metavar=("FROM", "TO"))
    parser.add_argument("--out", default="runs/compatibility.json")
    args = parser.parse_args()
    seeds = tuple(range(*args.seeds))
    c = course.setup(seeds=seeds, quiet=True)
    runs = c.runs(METHODS)
    table = {m: rows(c, m, seeds, runs[m]) for m in METHODS}
    print("| method | " + " | ".join(table["finetune"]) + " |")
    for m, cols in table.items():
        print(
            f"| {m} | "
            + " | ".join(f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" for v in cols.values())
            + " |"
        )
    paired = {}
    for m in METHODS[1:]:
        for k in ["final_in_first_gallery", "below_diagonal", "diagonal", "AM"]:
            d = np.array(table[m][k]) - np.array(table["finetune"][k])
            lo, hi = t_interval(d, 0.95)
            paired[f"{m}-finetune:{k}"] = {
                "mean": d.mean(),
                "low": lo,
                "high": hi,
                "seeds_above_0": int((d > 0).sum()),
            }
            print(
                f"{m} - finetune, {k}: {d.mean():+.3f}, 95% paired t [{lo:+.3f}, {hi:+.3f}], "
                f"{int((d > 0).sum())}/{len(d)} seeds above 0"
            )
    write_json(
        Path(args.out),
        {
            "seeds": seeds,
            "machine": machine(torch.device("cpu")),
            "per_seed": table,
            "paired_vs_finetune": paired,
        },
    )
