"""What one course training step costs on this CPU, per image, at several batch sizes.

The course's step as csdkit.train.train_task runs it (glyphs at 12 px, ResNet-8, channels_last,
one torch thread as every worker has): augment, the student's forward (and the frozen teacher's
for fd), the loss, backward, Adam. If the cost per image hardly falls as the batch grows, the
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
from csdkit.data import augment, channel_stats, normalize  # noqa: E402
from csdkit.models import resnet  # noqa: E402
from csdkit.runs import machine  # noqa: E402
from csdkit.train import batch_loss, preset  # noqa: E402


def seconds_per_image(method: str, batch: int, steps: int, warmup: int) -> float:
    cfg = preset("course")
    torch.manual_seed(0)
    model = resnet(cfg.depth, 16).to(memory_format=torch.channels_last)
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if method == "fd" else None
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=cfg.weight_decay)
    images = torch.randint(0, 256, (batch, 3, 12, 12), dtype=torch.uint8)
    labels = torch.arange(batch) % 16
    mean, std = channel_stats([0.5] * 3, [0.25] * 3, torch.device("cpu"))
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        x = normalize(augment(images, pad=cfg.crop_pad, flip=False), mean, std)
        x = x.contiguous(memory_format=torch.channels_last)
        loss, _ = batch_loss(model, teacher, x, labels, method, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / (steps * batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--images", type=int, default=8192, help="timed images per row (default 8192)")
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {machine(torch.device('cpu'))}, 1 thread")
    for method in ("finetune", "fd"):
        for b in a.batch_sizes:
            s = seconds_per_image(method, b, steps=max(4, a.images // b), warmup=3)
            print(f"{method:9s} batch {b:4d}: {s * 1e6:6.1f} µs an image")


if __name__ == "__main__":
    main()
