"""Training throughput, data loading included: the authors' input pipeline vs csdkit's.

One full CSD step on task 2 of 2 (CIFAR-100 shapes: ResNet-32 student with 100 classes, frozen
50-class teacher): student forward + backward, teacher forward, CE + triplet + KD + CSD, Adam.

    baseline  built like the authors' pipeline: a Dataset of uint8 HWC arrays, PIL images through
              torchvision RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor +
              Normalize(CIFAR-100 mean/std) in a DataLoader with worker processes; eager fp32.
    csdkit    the task's uint8 images live on the device; crop, flip and normalisation run there
              in batches (csdkit.data.augment / normalize); on CUDA bf16 autocast + channels_last
              + torch.compile (each can be turned off). On a CPU: the plain csdkit path, fp32.

Both run the same loss code (csdkit.train.batch_loss), in one process, on one device, alternating
pipelines per batch size. Images are random CIFAR-shaped uint8 (CIFAR-100 is not downloaded).

    python benchmarks/bench_train.py                      # writes benchmarks/results/train-*.json
    python benchmarks/bench_train.py --quick --out /tmp/x.json   # a smoke test of the script
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from csdkit.data import (  # noqa: E402
    CIFAR100_MEAN,
    CIFAR100_STD,
    augment,
    channel_stats,
    normalize,
)
from csdkit.models import ResNet, resnet  # noqa: E402
from csdkit.runs import cpu_name, refuse_existing, write_json  # noqa: E402
from csdkit.train import Config, batch_loss, speed_options  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


class HWCImages(torch.utils.data.Dataset):
    """What the authors' CIFAR-100 dataset hands torchvision: uint8 HWC arrays, one PIL image
    per item."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def baseline_batches(
    images: np.ndarray, labels: np.ndarray, batch: int, workers: int, device: torch.device
) -> Batches:
    from torchvision import transforms

    tf = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD),
    ])
    loader = torch.utils.data.DataLoader(
        HWCImages(images, labels, tf), batch_size=batch, shuffle=True, drop_last=True,
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    while True:  # epoch after epoch, as long as the benchmark asks
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def csdkit_batches(
    images: torch.Tensor, labels: torch.Tensor, batch: int, channels_last: bool
) -> Batches:
    """The lines of csdkit.train.train_task's loop that make a batch."""
    g = torch.Generator(device=images.device).manual_seed(0)
    mean, std = channel_stats(CIFAR100_MEAN, CIFAR100_STD, images.device)  # once, as train_task
    n = len(images)
    while True:
        order = torch.randperm(n, device=images.device, generator=g)
        for b in range(n // batch):
            idx = order[b * batch : (b + 1) * batch]
            x = normalize(augment(images[idx], pad=4, flip=True, generator=g), mean, std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, labels[idx]


def models(depth: int, device: torch.device) -> tuple[ResNet, ResNet]:
    """Task 2 of 2: a 50-class teacher (frozen, eval) and its copy grown to 100 classes."""
    torch.manual_seed(0)
    student = resnet(depth, 50).to(device)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    student.classifier.grow(50)
    return student, teacher


def measure(
    pipeline: str, batch: int, batches: Batches, student: ResNet, teacher: ResNet, cfg: Config,
    bf16: bool, compile_mode: str | None, warmup: int, steps: int, repeats: int,
    device: torch.device,
) -> dict:
    """`warmup` untimed steps, then `repeats` timed windows of `steps` steps each (training goes
    on across windows); images/s of the best window, as timeit does on a noisy machine."""
    cuda = device.type == "cuda"
    student.train()
    # csdkit: fused Adam, as train_task on CUDA; the baseline: PyTorch's default (foreach on
    # CUDA). None, not False: an explicit False would also switch the foreach default off.
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-5, weight_decay=5e-4,
                                 fused=True if cuda and pipeline == "csdkit" else None)
    loss_fn = batch_loss
    if compile_mode is not None:
        torch._dynamo.reset()  # a fresh compile per row: new batch size, new model
        loss_fn = torch.compile(batch_loss, mode=compile_mode, dynamic=False)
    cuda_graphs = compile_mode in ("reduce-overhead", "max-autotune")
    losses: list[torch.Tensor] = []

    def run_steps(n: int) -> float:  # returns the seconds spent getting batches
        data_seconds = 0.0
        for _ in range(n):
            t = time.perf_counter()
            x, y = next(batches)  # data loading is inside the timed region
            data_seconds += time.perf_counter() - t
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            loss, _ = loss_fn(student, teacher, x, y, "csd", cfg, bf16)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach().clone())  # no .item(): no sync inside the timed loop
        return data_seconds

    run_steps(warmup)  # DataLoader worker start-up, compilation, allocator and cuDNN warm-up
    windows = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        data_seconds = run_steps(steps)
        if cuda:
            torch.cuda.synchronize()
        windows.append((time.perf_counter() - start, data_seconds))
    last = torch.stack(losses).float().cpu()
    if not torch.isfinite(last).all():
        raise RuntimeError(f"{pipeline} at batch {batch}: non-finite loss")
    seconds, data_seconds = min(windows)
    return {
        "pipeline": pipeline, "batch_size": batch, "images_per_s": steps * batch / seconds,
        "images_per_s_windows": [steps * batch / w for w, _ in windows],
        "ms_per_step": 1000 * seconds / steps,
        # CPU time spent waiting in the batch iterator. On CUDA the csdkit batch is queued
        # asynchronously, so its device time shows up in the step, not here.
        "data_ms_per_step": 1000 * data_seconds / steps,
        "steps": steps, "repeats": repeats, "warmup": warmup, "last_loss": float(last[-1]),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50, help="timed steps per row (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed windows of --steps per row; the best is reported (default 3)")
    p.add_argument("--batch-sizes", default="128,512", help="comma-separated (default 128,512)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="baseline DataLoader workers (default min(8, cpu count))")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="csdkit on CUDA: torch.compile the step (default on; no effect on CPU)")
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                   help="torch.compile mode; 'reduce-overhead' adds CUDA graphs")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="csdkit on CUDA: bf16 autocast (default on)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="csdkit on CUDA: channels_last (default on)")
    p.add_argument("--images", type=int, default=10_000, help="random training images (10k)")
    p.add_argument("--depth", type=int, default=32, help="ResNet depth (default 32)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/...)")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.warmup, a.repeats, a.images, a.batch_sizes = 2, 1, 1, 64, "8,16"
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    date = datetime.date.today().isoformat()
    out = a.out or RESULTS / f"train-{slug}-{date}{'-quick' if a.quick else ''}.json"
    refuse_existing(out)
    sizes = [int(b) for b in a.batch_sizes.split(",")]
    cfg = Config(dataset="cifar100", depth=a.depth, bf16=a.bf16, channels_last=a.channels_last,
                 compile=a.compile_mode if a.compile else False)
    bf16, channels_last, compile_mode = speed_options(cfg, device)  # all off on a CPU

    # Random CIFAR-shaped data, all of task 2's classes (50..99).
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (a.images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(50, 100, a.images)
    dev_images = torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous().to(device)  # once
    dev_labels = torch.from_numpy(labels).to(device)

    rows = []
    for batch in sizes:
        if batch > a.images:
            raise ValueError(f"batch {batch} > --images {a.images}")
        student, teacher = models(a.depth, device)
        rows.append(measure("baseline", batch,
                            baseline_batches(hwc, labels, batch, a.workers, device),
                            student, teacher, cfg, False, None, a.warmup, a.steps, a.repeats,
                            device))
        student, teacher = models(a.depth, device)
        if channels_last:
            student = student.to(memory_format=torch.channels_last)
            teacher = teacher.to(memory_format=torch.channels_last)
        rows.append(measure("csdkit", batch,
                            csdkit_batches(dev_images, dev_labels, batch, channels_last),
                            student, teacher, cfg, bf16, compile_mode, a.warmup, a.steps,
                            a.repeats, device))
        print(f"{rows[-2]['pipeline']:>8} {batch:5d} {rows[-2]['images_per_s']:10.1f} img/s   "
              f"{rows[-1]['pipeline']:>8} {batch:5d} {rows[-1]['images_per_s']:10.1f} img/s",
              flush=True)

    speedups = {}
    for batch in sizes:
        base, fast = (next(r for r in rows if r["pipeline"] == p and r["batch_size"] == batch)
                      for p in ("baseline", "csdkit"))
        speedups[str(batch)] = fast["images_per_s"] / base["images_per_s"]
    result = {
        "device": name,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "threads_note": (f"both pipelines in the same process with torch.set_num_threads("
                         f"{torch.get_num_threads()}); the baseline's {a.workers} DataLoader "
                         "worker processes use 1 torch thread each (PyTorch's default)"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": date,
        "model": f"ResNet-{a.depth}, 100-class student, 50-class frozen teacher (task 2 of 2)",
        "loss": "CE + triplet + KD + CSD (csdkit.train.batch_loss, method csd)",
        "data": f"{a.images} random uint8 32x32x3 images, labels 50..99",
        "baseline": {"workers": a.workers, "precision": "fp32", "memory_format": "NCHW",
                     "compile": None},
        "csdkit": {"bf16": bf16, "channels_last": channels_last, "compile": compile_mode},
        "steps": a.steps,
        "repeats": a.repeats,
        "warmup": a.warmup,
        "quick": a.quick,
        "rows": rows,
        "speedups": speedups,
        "speedup_at_128": speedups.get("128"),
    }

    print(f"\ndevice {name} ({result['cpu']}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}), torch {torch.__version__}")
    print(f"csdkit path: bf16={bf16} channels_last={channels_last} compile={compile_mode}")
    print("| batch | baseline img/s | csdkit img/s | csdkit / baseline "
          "| data ms/step baseline / csdkit |\n|---|---|---|---|---|")
    for batch in sizes:
        b, f = (next(r for r in rows if r["pipeline"] == p and r["batch_size"] == batch)
                for p in ("baseline", "csdkit"))
        print(f"| {batch} | {b['images_per_s']:.1f} | {f['images_per_s']:.1f} "
              f"| {speedups[str(batch)]:.2f}x "
              f"| {b['data_ms_per_step']:.1f} / {f['data_ms_per_step']:.1f} |")

    write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
