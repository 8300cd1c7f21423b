"""What makes CSD work? An ablation of its loss, with paired-seed 95% intervals.

Every arm trains CE + triplet on every task and, from task 2 on, KD plus one feature term
(csdkit.losses.csd_loss for the CSD forms):

    finetune        no distillation (the lower bound, for context)
    lwf             KD only
    fd              KD + L2 between normalised student and teacher features
    csd t=0.07      KD + Eq. 8 of the paper (teacher anchors, student contrast set), tau 0.07
    csd t=1         KD + Eq. 8 as printed: no temperature (tau = 1)
    csd_transposed  KD + student anchors against the teacher's features; this is exactly the
                    authors' code without its student-student terms
    csd_official    KD + the authors' code: SupCon over [student, teacher] views, tau 0.07
    csd_student     KD + the authors' code without its teacher terms: SupCon on the student
    bct, simplex    the two methods built for compatibility (notebook 08), for context: BCT's
                    influence loss (w_bct of the course preset), a fixed simplex classifier

on the course protocol (glyphs at 12 px, 5 tasks of 8 letters; PRESETS["course"]), seeds
0-4 (the seed draws the class order and the initialisation; same seed, same first task for
every arm). Reported: the paper's Average (mean over tasks of R@1 within each task) and the
first task's R@1 after the last task, on the test fonts; and AM, the mean of each run's
compatibility matrix's lower triangle (notebook 08), for every arm.

    python benchmarks/ablate_csd.py      # writes benchmarks/results/ablate-csd.json

Runs are cached in runs/cache/ (shared with `python -m csdkit demo --full` and the notebooks,
which train several of the same arms) and resumed if the script is interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from csdkit import report  # noqa: E402
from csdkit.runs import cache_folder, machine, refuse_existing, write_json  # noqa: E402
from csdkit.train import preset  # noqa: E402

ARMS = {
    "finetune": ("finetune", {}),
    "lwf": ("lwf", {}),
    "fd": ("fd", {}),
    "csd t=0.07": ("csd", {}),
    "csd t=1": ("csd", {"csd_temperature": 1.0}),
    "csd_transposed": ("csd_transposed", {}),
    "csd_official": ("csd_official", {}),
    "csd_student": ("csd_student", {}),
    "bct": ("bct", {}),
    "simplex": ("simplex", {}),
}
# Each pair isolates one ingredient (read "a - b": what a adds to b).
PAIRS = [
    ("csd_official", "csd_transposed"),  # the student-student terms, given the teacher terms
    ("csd_official", "csd_student"),  # the teacher terms, given the student-student terms
    ("csd_student", "lwf"),  # student-student terms alone, over KD alone
    ("csd_transposed", "lwf"),  # teacher terms alone (student anchors), over KD alone
    ("csd t=0.07", "lwf"),  # Eq. 8 over KD alone
    ("csd t=0.07", "csd_transposed"),  # teacher anchors vs student anchors
    ("csd t=1", "csd t=0.07"),  # the temperature of Eq. 8
    ("csd_official", "fd"),
    ("csd t=0.07", "fd"),
    ("fd", "lwf"),
    ("bct", "finetune"),  # what the compatibility methods do to the paper's metrics
    ("simplex", "finetune"),
]
METRICS = ("task_avg_R@1", "first_task_R@1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path("runs/cache"), help="the run cache "
                   "(shared with the demo and the notebooks)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" /
                   "ablate-csd.json", help="results file (never overwritten)")
    a = p.parse_args()
    refuse_existing(a.out)
    torch.set_num_threads(1)
    cfg, seeds = preset("course"), list(range(a.seeds))
    start = time.perf_counter()
    _, rows = report.compare(cfg, ARMS, seeds, cache_folder(a.cache, torch.device("cpu")),
                             a.workers)
    wall = time.perf_counter() - start
    family = len(PAIRS) * len(METRICS)
    table = report.summary(rows, list(ARMS))
    paired = pd.concat([report.paired_differences(rows, PAIRS, m, family=family)
                        for m in METRICS])
    print(f"course protocol, {a.seeds} seeds, mean ± std ({wall:.0f} s wall):")
    print(table[["seeds", *METRICS, "pooled_R@1", "AM"]].to_string())
    print(f"\npaired differences, 95% t-intervals (beyond_noise_all: Bonferroni over {family}):")
    print(paired.to_string())
    write_json(a.out, {"config": {k: str(v) for k, v in vars(cfg).items()}, "seeds": seeds,
                       "arms": {k: [m, c] for k, (m, c) in ARMS.items()}, "rows": rows,
                       "summary": table.reset_index().to_dict("records"),
                       "paired": paired.reset_index().to_dict("records"),
                       "wall_seconds": wall, "workers": a.workers, "torch": torch.__version__,
                       "machine": machine(torch.device("cpu"))})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
