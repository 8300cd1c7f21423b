"""csdkit: a teaching kit for continual representation learning with Contrastive Supervised
Distillation (Barletti et al., ICIAP 2021).

Modules, one idea each: data (datasets, task splits, augmentation), models (CIFAR ResNet, a
growing cosine or a fixed simplex classifier), losses (triplet, KD, FD, CSD), metrics (R@K, mAP,
compatibility), train (config, presets, a task, a run), runs (identity, checkpoints, the run
cache), report (tables, figures), course (the notebooks' setup and claims), drift and widgets
(UMAP maps, the retrieval explorer), cli (`python -m csdkit demo | run`).
"""

__version__ = "0.1.0"


def require(ok: bool, message: str) -> None:
    """Every input check in csdkit: a ValueError that says what was wrong and how to fix it."""
    if not ok:
        raise ValueError(message)
