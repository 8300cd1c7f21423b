"""csdkit: a teaching kit for continual representation learning with Contrastive Supervised
Distillation (Barletti et al., ICIAP 2021).

Modules, one idea each: data (datasets, task splits, augmentation), models (CIFAR ResNet,
growing cosine classifier), losses (CE is torch's; triplet, KD, FD, CSD), metrics (Recall@K,
mAP, task matrix), train (config, presets, training, checkpoints), report (tables, figures),
cli (`python -m csdkit demo | run`).
"""

__version__ = "0.1.0"
