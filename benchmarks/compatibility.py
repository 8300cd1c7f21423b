"""Compatibility of every method on held-out seeds: the table notebook 08's claims rest on.

    python benchmarks/compatibility.py --seeds 100 120 \
        --out benchmarks/results/compatibility-heldout.json
    python benchmarks/compatibility.py --calibrate benchmarks/results/compatibility-heldout.json

Course protocol, task 1's test images (the matrix every run stores, `RunResult.compatibility`).
Per method, mean ± sd over the seeds: AC, AM, the mean diagonal (each model in its own gallery),
the mean below the diagonal, the final model searching the first model's gallery, the final model
in its own gallery (task 1), pooled R@1; then each method minus fine-tuning, paired by seed,
with a 95% t interval. --calibrate measures notebook 08's claims (course.CLAIMS, measured from
the stored per-seed values) on every 3-seed subset of the file's seeds, as
benchmarks/calibrate_claims.py does for 01-06: the thresholds were set from it by that script's
rule (a round value at or beyond mean - 3 sd, "at most" mirrored).
"""

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from csdkit import course
from csdkit.report import t_interval
from csdkit.runs import machine, write_json

METHODS = course.COMPATIBILITY
# column of the table -> the key of Course.facts it is read from
KEYS = {"AC": "AC", "AM": "AM", "diagonal": "diagonal", "below_diagonal": "below_diagonal",
        "final_in_first_gallery": "old_gallery_R1", "final_in_own_gallery": "first_task_final",
        "pooled": "pooled"}


def rows(c: course.Course, method: str, seeds: tuple[int, ...]) -> dict[str, list[float]]:
    """column -> the value per seed (trains the runs if need be)."""
    return {col: [c.facts(method, s)[key] for s in seeds] for col, key in KEYS.items()}


class Stored:
    """Stands in for a course.Course in a claim's measurement: facts from a results file."""

    def __init__(self, results: dict) -> None:
        self.seeds, self.per_seed = list(results["seeds"]), results["per_seed"]

    def facts(self, method: str, seed: int) -> dict[str, float]:
        i = self.seeds.index(seed)
        return {key: self.per_seed[method][col][i] for col, key in KEYS.items()}


def calibrate(path: Path) -> None:
    """Measure notebook 08's claims (course.CLAIMS) on every 3-seed subset of the results
    file's seeds, summarised as calibrate_claims.py does; store the table (key "claims_08")."""
    from calibrate_claims import summarise  # this folder's script, on sys.path when run

    results = json.loads(path.read_text())
    stored = Stored(results)
    names = [name for name, claim in course.CLAIMS.items() if claim.notebook == "08"]
    rows = [{"claim": name, "seeds": subset, "value": course.CLAIMS[name].measure(stored, subset),
             "cpu": "native"}
            for name in names for subset in itertools.combinations(stored.seeds, len(course.SEEDS))]
    table, _ = summarise(rows, "native", claims=names)
    print("| claim | threshold | mean ± sd over subsets | margin (sd) | fails on |")
    print("|---|---|---|---|---|")
    for t in table:
        print(f"| {t['claim']} | {'at most' if t['at_most'] else 'at least'} {t['threshold']:g} | "
              f"{t['mean']:.3f} ± {t['sd']:.3f} | {t['margin_sd']:.1f} | "
              f"{100 * t['fails_on']:.1f}% |")
    write_json(path, {**results, "claims_08": table})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs=2, default=(100, 120), metavar=("FROM", "TO"))
    parser.add_argument("--out", default="runs/compatibility.json")
    parser.add_argument("--calibrate", type=Path, metavar="JSON",
                        help="measure notebook 08's claims on a results file's seeds, in place")
    args = parser.parse_args()
    if args.calibrate:
        raise SystemExit(calibrate(args.calibrate))
    seeds = tuple(range(*args.seeds))
    c = course.setup(seeds=seeds, quiet=True)
    c.runs(METHODS)  # train what the cache lacks, two workers at a time
    table = {m: rows(c, m, seeds) for m in METHODS}
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
