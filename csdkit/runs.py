"""The run cache: what names a run, where it trained, checkpoints, and many runs at once.

A run is saved under a folder named by its identity (config, method, data) inside a cache
folder per torch release and machine arithmetic, so notebooks, demo and benchmarks share
finished runs and never mix two machines' numbers. Writes are atomic (temp file, fsync, rename).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from csdkit import losses, require
from csdkit.models import ResNet, resnet

if TYPE_CHECKING:
    from csdkit.data import Dataset
    from csdkit.train import Config, RunResult

#: Settings that act only from the second task on: runs that differ only in these (and in the
#: method, joint aside) train the same first task, so `run_grid` trains it once for all.
LATER_TASKS_ONLY = ("method", "lr_later", "w_kd", "w_fd", "w_csd", "w_bct", "kd_temperature",
                    "csd_temperature")


def run_identity(cfg: Config, method: str, data: Dataset) -> dict:
    """What decides a run's numbers: the config (less device and bf16, recorded apart in
    `trained_on`, and where the data live), the method and the data (`Dataset.digest`).
    channels_last and compile stay in: on a GPU they change the kernels, so the last digits."""
    d = dataclasses.asdict(cfg)
    for k in ("device", "bf16", "data_root", "data_path"):
        d.pop(k)
    d["milestones"] = list(d["milestones"])
    return json.loads(json.dumps({**d, "method": method, "data": data.digest()}))


def run_id(identity: dict) -> str:  # 8 hex digits naming an identity, for folder names
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]


def run_name(cfg: Config, method: str, data: Dataset) -> str:  # <dataset>-<method>-seed<s>-<id>
    return f"{cfg.dataset}-{method}-seed{cfg.seed}-{run_id(run_identity(cfg, method, data))}"


def first_task_config(cfg: Config) -> Config:
    """The config a shared first task is trained and saved under: LATER_TASKS_ONLY at their
    defaults, so every run that differs only in those finds the same checkpoint."""
    defaults = type(cfg)()
    return cfg.replace(**{k: getattr(defaults, k) for k in LATER_TASKS_ONLY if k != "method"})


def first_method(method: str) -> str:  # what trains a method's shared first task
    return "simplex" if "simplex" in method.split("+") else "finetune"


def first_name(cfg: Config, data: Dataset, method: str = "finetune") -> str:  # its folder
    return f"{cfg.dataset}-first-seed{cfg.seed}-" \
           f"{run_id(run_identity(first_task_config(cfg), first_method(method), data))}"


def cpu_name() -> str:  # the CPU's model name (Linux), else what the platform says
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


@functools.cache
def arithmetic_fingerprint() -> str:
    """8 hex digits of what a training step computes on this CPU: the bits of a ResNet-8's
    gradients on a fixed batch, with one thread. CPUs (or emulations) that compute the same
    share it; another instruction set, library or torch release that changes the numbers
    changes it. It catches what ONEDNN_MAX_CPU_ISA does, which no torch call reports."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # leaves the caller's random state alone
            torch.manual_seed(0)
            net = resnet(8, 8)
            x, y = torch.randn(16, 3, 12, 12), torch.arange(16) % 8
        logits, features = net(x)
        (F.cross_entropy(logits, y) + losses.triplet_loss(features, y)).backward()
        digest = hashlib.sha1()
        for p in net.parameters():
            digest.update(p.grad.numpy().tobytes())
        return digest.hexdigest()[:8]
    finally:
        torch.set_num_threads(threads)


def machine(device: torch.device) -> str:
    """The device a run trains on, as its last digits depend on it: the GPU's name; or the
    CPU's name, ATen's vector instruction set and the arithmetic fingerprint."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return (f"cpu ({cpu_name()}, {torch.backends.cpu.get_cpu_capability()}, arithmetic "
            f"{arithmetic_fingerprint()})")


def cache_folder(root: str | Path, device: torch.device) -> Path:  # the cache of this machine
    return Path(root) / f"torch{torch.__version__.split('+')[0]}-{run_id({'m': machine(device)})}"


# --------------------------------------------------------------------------------------------
# Files


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(temp path), fsync, rename over `path`: after a crash the file is the old or the whole
    new one; a temp name per writer, so two processes never mix their bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    os.umask(umask := os.umask(0o22))  # read it: mkstemp makes files private, these are not
    try:
        os.chmod(tmp, 0o666 & ~umask)
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, default=float)))


def refuse_existing(path: Path) -> Path:  # results are evidence: refuse before any work
    if Path(path).exists():
        raise SystemExit(f"{path} exists; pass --out another path (or delete it on purpose)")
    return Path(path)


def save_checkpoint(path: Path, model: ResNet, info: dict) -> None:  # weights and `info`
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save({"model": state, **info}, tmp))


def load_checkpoint(path: str | Path, model: ResNet | None = None) -> tuple[ResNet, dict]:
    """Load a csdkit checkpoint (weights_only=True). Builds the model it describes, or checks
    that `model` has the same architecture and class count and loads into it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in ("model", "depth", "n_classes") if not isinstance(ckpt, dict) or
               k not in ckpt]
    require(not missing, f"{path} is not a csdkit checkpoint (no {', '.join(map(repr, missing))} "
            "entries); csdkit writes them with save_checkpoint or `csdkit run`")
    depth, n_classes = int(ckpt["depth"]), int(ckpt["n_classes"])
    simplex = bool(ckpt.get("simplex"))  # checkpoints from before it have no such entry
    model = resnet(depth, n_classes, simplex) if model is None else model
    require((model.depth, model.n_classes, model.simplex) == (depth, n_classes, simplex),
            f"{path} holds a ResNet-{depth} with {n_classes} classes (simplex={simplex}), but the "
            f"model given is a ResNet-{model.depth} with {model.n_classes} (simplex="
            f"{model.simplex}); build it with resnet({depth}, {n_classes}, simplex={simplex}) or "
            "call load_checkpoint(path) without a model")
    model.load_state_dict(ckpt["model"])
    return model, {k: v for k, v in ckpt.items() if k != "model"}


def resume(path: Path, identity: dict, trained_on: dict, anywhere: bool, device: torch.device,
           shared_first: bool = False) -> tuple[ResNet, dict]:
    """A finished task's checkpoint, checked to belong to this run (shared_first: a first task
    shared between methods, so all but LATER_TASKS_ONLY must agree)."""
    model, info = load_checkpoint(path)
    saved = json.loads(info.get("identity", "{}"))
    if shared_first:
        require(info.get("task") == 0 and saved.get("method") != "joint",
                f"{path} is not a first-task checkpoint of a continual method")
        saved = {**saved, **{k: identity[k] for k in LATER_TASKS_ONLY}}
    kinds, simplex = ("cosine", "simplex"), "simplex" in identity["method"].split("+")
    require(model.simplex == simplex, f"{path} holds a model with a {kinds[model.simplex]} "
            f"classifier, but {identity['method']} trains a {kinds[simplex]} one: give it a "
            "first task trained with its own kind of classifier")
    diff = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    require(not diff, f"{path} belongs to another run (differs in: {', '.join(diff)}; 'data' "
            "means other images, labels or class order). Nothing was overwritten: choose another "
            f"output folder, or delete {path.parent} to start afresh.")
    theirs = {k: info.get(k) for k in trained_on}
    require(theirs == trained_on or anywhere, f"{path} was trained on {theirs['machine']} in "
            f"{theirs['precision']}, this run is on {trained_on['machine']} in "
            f"{trained_on['precision']}: its numbers would mix two machines. To resume anyway "
            "pass resume_anywhere=True (--resume-anywhere); otherwise use another output folder.")
    return model.to(device), info


# --------------------------------------------------------------------------------------------
# Many runs


def _run_job(job: dict) -> RunResult:
    from csdkit.train import run

    torch.set_num_threads(1)
    return run(**job)


_POOLS: dict = {}  # workers -> a pool kept for the session: a new one costs ~3 s of imports


def _run_parallel(jobs: list[dict], workers: int) -> list[RunResult]:
    """run(**job) for every job, `workers` at a time in spawned processes (safe on every OS).
    Each job seeds itself and sets its threads, so a worker that ran other jobs before computes
    the same numbers as a fresh one."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    if workers <= 1 or len(jobs) <= 1:
        threads = torch.get_num_threads()
        try:
            return [_run_job(job) for job in jobs]
        finally:
            torch.set_num_threads(threads)
    if workers not in _POOLS:
        _POOLS[workers] = pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"))
        atexit.register(pool.shutdown)  # before the interpreter tears the module down
    try:
        return list(_POOLS[workers].map(_run_job, jobs))
    except BrokenProcessPool:  # a worker died (e.g. out of memory): the next call starts anew
        _POOLS.pop(workers).shutdown(wait=False)
        raise


def run_grid(runs: list[tuple[Config, str]], folder: str | Path, workers: int = 2,
             first_only: bool = False, last_task: int | None = None) -> list[RunResult]:
    """Train (config, method) pairs, `workers` at a time with one torch thread each (a CPU
    run's last digits depend on its threads, never on `workers`); return results in order.
    Each run resumes from folder/<run_name>/; runs that differ only in LATER_TASKS_ONLY share
    one first task in folder/<first_name>/. first_only: train and return just those.
    last_task: stop every run after this task (0-based); the full run resumes from it. Workers
    are spawned processes that import the caller again: call this from a notebook, or from a
    script under `if __name__ == "__main__":`."""
    from csdkit.train import prepare, run

    folder = Path(folder)
    data = {repr(cfg): prepare(cfg) for cfg in {repr(c): c for c, _ in runs}.values()}
    plans = [{"cfg": cfg, "method": method, "quiet": True,
              "out_dir": folder / run_name(cfg, method, data[repr(cfg)][0]),
              "first": folder / first_name(cfg, data[repr(cfg)][0], method)}
             for cfg, method in runs]
    done = "result.json" if last_task is None else f"task{last_task}.pt"
    todo = [p for p in plans if not (p["out_dir"] / done).exists() or first_only]
    firsts = {p["first"]: {"cfg": first_task_config(p["cfg"]), "method": first_method(p["method"]),
                           "last_task": 0, "quiet": True} for p in todo if p["method"] != "joint"}
    _run_parallel([{**job, "out_dir": path} for path, job in firsts.items()
                   if not (path / "task0.pt").exists()], workers)
    if first_only:
        return [run(**firsts[p["first"]], out_dir=p["first"], data=data[repr(p["cfg"])])
                for p in plans]
    _run_parallel([{k: v for k, v in p.items() if k != "first"} | {"last_task": last_task} |
                   ({} if p["method"] == "joint" else {"first_task": p["first"] / "task0.pt"})
                   for p in todo], workers)
    return [run(p["cfg"], p["method"], p["out_dir"], quiet=True, data=data[repr(p["cfg"])],
                last_task=last_task) for p in plans]  # all trained now: this only loads
