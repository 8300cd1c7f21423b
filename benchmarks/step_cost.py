"""What one course training step costs on this CPU, per image, at several batch sizes.

csdkit.train.train_task itself, one epoch (the course preset: 12 px, ResNet-8, channels_last; one
torch thread as every worker has): augment, the student's forward (and the frozen teacher's for
fd), the loss, backward, Adam. If the cost per image hardly falls as the batch grows, the
step is bound by arithmetic, not by per-call overhead, and only less training makes the course
shorter. Random uint8 images of the course's shape; nothing is written.

    python benchmarks/step_cost.py                      # finetune and fd at batch 16, 64, 256
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from csdkit.data import ImageSet  # noqa: E402
from csdkit.models import resnet  # noqa: E402
from csdkit.runs import machine  # noqa: E402
from csdkit.train import preset, train_task  # noqa: E402


def seconds_per_image(method: str, batch: int, images: int) -> float:
    """One epoch of csdkit.train.train_task over `images` random images, timed after a warm-up
    epoch (oneDNN builds its kernels on first use), per image trained."""
    cfg = preset("course").replace(batch_size=batch)
    torch.manual_seed(0)
    model = resnet(cfg.depth, 16)
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if method == "fd" else None
    n = max(4, images // batch) * batch
    task = ImageSet(torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8), torch.arange(n) % 16)

    def epoch() -> None:
        train_task(model, teacher, task, cfg, method, [0.5] * 3, [0.25] * 3, lr=1e-3, epochs=1,
                   seed=0, quiet=True)
    epoch()
    start = time.perf_counter()
    epoch()
    return (time.perf_counter() - start) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--images", type=int, default=32768, help="timed images per row (default 32768)")
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {machine(torch.device('cpu'))}, 1 thread")
    for method in ("finetune", "fd"):
        for b in a.batch_sizes:
            s = seconds_per_image(method, b, a.images)
            print(f"{method:9s} batch {b:4d}: {s * 1e6:6.1f} µs an image")


if __name__ == "__main__":
    main()
