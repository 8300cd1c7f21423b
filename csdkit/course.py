"""What every notebook of the course does first, in one call, and the claim checks.

    from csdkit import course
    c = course.setup()                       # seeds, the course data, a run cache
    runs = c.runs(["finetune", "fd"])        # {method: [RunResult per seed]}, cached
    course.claim("fine-tuning forgets", drop >= 0.10, drop=drop)

Training happens in worker processes, one torch thread each (two at a time on a 2-core
machine): on a CPU a run's last digits depend on its thread count, so they never depend on how
many workers there are. Finished runs are cached under runs/course/, in a folder per torch
version and CPU instruction set (runs trained on another machine are not mixed in), named by
each run's identity (config, method, data): a changed parameter trains anew, never reuses.
"""

from __future__ import annotations

import importlib.util
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from csdkit import train
from csdkit.data import Dataset, TaskSplit
from csdkit.models import ResNet
from csdkit.train import (
    Config,
    RunResult,
    extract,
    load_checkpoint,
    prepare,
    preset,
    run_grid,
    run_id,
    run_name,
)

#: The seeds every notebook trains: three, so that no finding rests on one run.
SEEDS = (0, 1, 2)


def claim(statement: str, holds: bool, **measured: float) -> None:
    """A notebook's claim check: print `✔ statement` (a fixed line, which the notebook tests
    compare exactly), or fail with the measured values when the claim does not hold."""
    if not holds:
        values = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
                           for k, v in measured.items())
        raise AssertionError(f"✘ {statement}: does not hold here ({values})")
    print(f"✔ {statement}")


def repository_root() -> Path:
    """The checkout holding csdkit/ (where data/ and runs/ go), or the working directory."""
    here = Path.cwd()
    return next((p for p in [here, *here.parents] if (p / "csdkit").is_dir()), here)


@dataclass
class Course:
    cfg: Config  # the course preset with the notebook's parameters; seed = the first seed
    seeds: tuple[int, ...]
    cache: Path
    workers: int
    _data: dict = field(default_factory=dict, repr=False)

    def data(self, seed: int | None = None) -> tuple[Dataset, TaskSplit]:
        """The dataset, relabelled in the class order of `seed` (default: the first seed)."""
        seed = self.seeds[0] if seed is None else seed
        if seed not in self._data:
            self._data[seed] = prepare(self.cfg.replace(seed=seed))
        return self._data[seed]

    def runs(self, methods: list[str], seeds: tuple[int, ...] | None = None
             ) -> dict[str, list[RunResult]]:
        """Train (or load) every method for every seed: {method: [result per seed]}. Every
        method but joint starts from the same first task of a seed, trained once."""
        seeds = self.seeds if seeds is None else tuple(seeds)
        results = run_grid([(self.cfg.replace(seed=s), m) for m in methods for s in seeds],
                           self.cache, self.workers)
        return {m: results[i * len(seeds):(i + 1) * len(seeds)] for i, m in enumerate(methods)}

    def model(self, method: str, seed: int | None = None, task: int = -1) -> ResNet:
        """The model of `method` after `task` (0-based; -1: the last), in eval mode."""
        seed = self.seeds[0] if seed is None else seed
        result = self.runs([method], (seed,))[method][0]  # trains it if need be
        folder = self.cache / run_name(self.cfg.replace(seed=seed), method, self.data(seed)[0])
        last = len(result.recall) - 1
        return load_checkpoint(folder / f"task{last if task == -1 else task}.pt")[0].eval()

    def features(self, model: ResNet, images: torch.Tensor, seed: int | None = None
                 ) -> torch.Tensor:
        """Features [N, 64] of uint8 images [N, 3, H, W] (eval mode)."""
        data = self.data(seed)[0]
        return extract(model, images, data.mean, data.std)[0]


def setup(
    dataset: str | None = None,
    epochs: int | None = None,
    seeds: tuple[int, ...] = SEEDS,
    device: str = "cpu",
    quiet: bool = False,
) -> Course:
    """Everything a notebook needs before it teaches: checks the install, seeds Python, NumPy
    and torch, loads the course data and opens the run cache. `dataset`/`epochs` override the
    `course` preset's (e.g. dataset="digits", the fastest). Prints the machine in one line."""
    missing = [m for m in ("sklearn", "seaborn", "umap", "ipywidgets")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(
            f"missing: {', '.join(missing)}. From the repository root run `pip install -e .` "
            "(in Colab: `%pip install -e /content/csdkit`), then restart the kernel.")
    import matplotlib.pyplot as plt
    import seaborn as sns

    cores = os.cpu_count() or 1
    torch.set_num_threads(min(2, cores))  # the notebook's own work; training runs in workers
    random.seed(seeds[0])
    np.random.seed(seeds[0])
    torch.manual_seed(seeds[0])
    sns.set_theme(style="whitegrid", context="notebook")
    plt.rcParams.update({"figure.dpi": 80, "axes.titlesize": 11})

    root = repository_root()
    cfg = preset("course").replace(seed=seeds[0], device=device, data_root=str(root / "data"))
    if dataset is not None:
        cfg = cfg.replace(dataset=dataset)
    if epochs is not None:
        cfg = cfg.replace(epochs=epochs)
    # Runs are cached per machine: another CPU (or the same one emulating another, as the
    # notebook tests do), another torch or another GPU computes other last digits.
    where = train.machine(train.resolve_device(device))
    folder = f"torch{torch.__version__.split('+')[0]}-{run_id({'machine': where})}"
    c = Course(cfg, tuple(seeds), root / "runs" / "course" / folder,
               workers=min(2, cores) if device == "cpu" else 1)
    if not quiet:
        print(f"torch {torch.__version__} on {where}, CPU capability "
              f"{torch.backends.cpu.get_cpu_capability()}; {cores} cores: {c.workers} run(s) "
              f"trained at a time, one thread each; runs cached in {c.cache}")
    return c
