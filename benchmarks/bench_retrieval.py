"""Retrieval evaluation: time and peak memory of csdkit.metrics at gallery sizes 10k..100k.

Leave-one-out Recall@1 and mAP (every item queries all the others) on N random 64-d features
of 100 classes (class centres plus noise), on the CPU and, when present, on CUDA. Both metrics
compare `chunk_size` queries with the whole gallery at a time, so the extra memory should grow
like chunk x N, never like N x N (a 100k x 100k float32 similarity matrix would be 40 GB).

Memory: on CUDA torch.cuda.max_memory_allocated() minus what was allocated before the call; on
the CPU the rise of the process's peak RSS (getrusage ru_maxrss) across the call. A peak only
ever grows, so each (device, size, metric) runs in its own subprocess.

    python benchmarks/bench_retrieval.py                        # 10k, 50k, 100k; CPU and CUDA
    python benchmarks/bench_retrieval.py --sizes 10000,50000 --map-sizes 10000 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from csdkit import metrics  # noqa: E402
from csdkit.runs import refuse_existing, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def features(n: int, dim: int, classes: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, dim, generator=g)
    x = centres[labels] + 1.5 * torch.randn(n, dim, generator=g)  # R@1 well between 0 and 1
    return x.to(device), labels.to(device)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def one(device: str, n: int, metric: str, dim: int, classes: int, chunk: int) -> dict:
    """Time one metric at one size in this process; returns a row."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    fn = {"recall@1": lambda f, y: metrics.recall_at_k(f, y, k=1, chunk_size=chunk),
          "mAP": lambda f, y: metrics.mean_average_precision(f, y, chunk_size=chunk)}[metric]
    f, y = features(n, dim, classes, dev)
    fn(f[:256], y[:256])  # warm up kernels / allocator on a tiny set
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        before = peak_rss_bytes()
    start = time.perf_counter()
    value = fn(f, y)  # returns a Python float: already synchronised
    seconds = time.perf_counter() - start
    extra = (torch.cuda.max_memory_allocated(dev) if cuda else peak_rss_bytes()) - before
    chunk_bytes = min(chunk, n) * n * 4  # one float32 similarity block [chunk, N]
    return {
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "n": n, "metric": metric,
        "value": value, "seconds": seconds, "chunk_size": chunk,
        "peak_extra_bytes": max(extra, 0), "chunk_block_bytes": chunk_bytes,
        "peak_over_block": max(extra, 0) / chunk_bytes, "full_matrix_bytes": n * n * 4,
        "memory_measure": "cuda max_memory_allocated" if cuda else "peak RSS rise (ru_maxrss)",
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,50000,100000", help="gallery sizes for Recall@1")
    p.add_argument("--map-sizes", help="gallery sizes for mAP (default: --sizes); a full sort of "
                   "every row, slow on a CPU")
    p.add_argument("--devices", help="comma-separated (default: cpu, plus cuda when present)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--chunk-size", type=int, default=1024, help="queries per block (1024)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--in-process", action="store_true",
                   help="no subprocesses (quicker; CPU peak-RSS figures then mean little)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--one", nargs=3, metavar=("DEVICE", "N", "METRIC"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.map_sizes, a.chunk_size = "500,1000", "500", 128
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.one:  # a child: one measurement, one JSON line on stdout
        row = one(a.one[0], int(a.one[1]), a.one[2], a.dim, a.classes, a.chunk_size)
        print(json.dumps(row))
        return row
    devices = a.devices.split(",") if a.devices else ["cpu"] + (
        ["cuda"] if torch.cuda.is_available() else [])
    device = torch.cuda.get_device_name() if "cuda" in devices else "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    date = datetime.date.today().isoformat()
    out = a.out or RESULTS / f"retrieval-{slug}-{date}{'-quick' if a.quick else ''}.json"
    refuse_existing(out)
    sizes = [int(s) for s in a.sizes.split(",")]
    map_sizes = [int(s) for s in (a.map_sizes or a.sizes).split(",")]
    jobs = [(d, n, "recall@1") for d in devices for n in sizes]
    jobs += [(d, n, "mAP") for d in devices for n in map_sizes]
    rows = []
    for device, n, metric in jobs:
        if a.in_process:
            row = one(device, n, metric, a.dim, a.classes, a.chunk_size)
        else:
            cmd = [sys.executable, __file__, "--one", device, str(n), metric, "--dim",
                   str(a.dim), "--classes", str(a.classes), "--chunk-size", str(a.chunk_size)]
            if a.threads:
                cmd += ["--threads", str(a.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['device']:>24} {metric:>8} N={n:>7}  {row['seconds']:8.2f} s  "
              f"value {row['value']:.4f}  peak extra {row['peak_extra_bytes'] / 2**20:8.1f} MiB "
              f"= {row['peak_over_block']:.1f} x chunk block ({a.chunk_size} x N x 4 B); "
              f"full N x N would be {row['full_matrix_bytes'] / 2**30:.1f} GiB", flush=True)
    result = {
        "device": device,
        "devices": devices,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": date,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "setting": f"leave-one-out, {a.dim}-d random features, {a.classes} classes, "
                   f"chunk_size {a.chunk_size}",
        "subprocess_per_row": not a.in_process,
        "rows": rows,
    }
    write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
