"""Training: one config, one function per task, one function for a whole class-incremental run.

The objective for task t (Barletti et al. 2021; see csdkit.losses for each term):

    finetune      L = CE + Triplet                       (the lower bound)
    lwf           L = CE + Triplet + KD                   (Learning without Forgetting)
    fd            L = CE + Triplet + KD + FD              (+ L2 feature distillation)
    csd           L = CE + Triplet + KD + CSD             (the paper's Eq. 8: teacher anchors)
    csd_official  L = CE + Triplet + KD + CSD(official)   (the authors' SupCon-over-two-views form)
    joint         L = CE + Triplet on all classes at once (the upper bound)

    bct           L = CE + Triplet + BCT                  (the old classifier on new features)
    simplex       L = CE + Triplet, fixed simplex classifier (joined by "+": simplex+fd, ...)

and two CSD ablations (benchmarks/ablate_csd.py): csd_transposed (csd_official without its
student-student terms) and csd_student (those terms alone: SupCon on the student).

The teacher is the model at the end of the previous task, frozen: a copy in eval mode (BatchNorm
keeps its running statistics) under no_grad; the authors' code left it in train mode. Each task
keeps its last epoch: no checkpoint is chosen by a test score.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from csdkit import losses, metrics, models, require
from csdkit.data import (
    Dataset,
    ImageSet,
    TaskSplit,
    augment,
    channel_stats,
    load_dataset,
    make_split,
    normalize,
)
from csdkit.models import CosineClassifier, ResNet, extract, progress_bar, resnet
from csdkit.runs import machine, resume, run_identity, save_checkpoint, write_json

METHODS = {
    "finetune": ("ce", "triplet"),
    "lwf": ("ce", "triplet", "kd"),
    "fd": ("ce", "triplet", "kd", "fd"),
    "csd": ("ce", "triplet", "kd", "csd"),
    "csd_official": ("ce", "triplet", "kd", "csd"),
    "csd_transposed": ("ce", "triplet", "kd", "csd"),
    "csd_student": ("ce", "triplet", "kd", "csd"),
    "joint": ("ce", "triplet"),
    "bct": ("ce", "triplet", "bct"),  # BCT's influence loss (Shen et al., CVPR 2020)
    "simplex": ("ce", "triplet"),  # with a fixed simplex classifier (models.SimplexClassifier)
}
#: Which form of csdkit.losses.csd_loss each CSD method trains with.
CSD_VARIANT = {"csd": "paper", "csd_official": "official", "csd_transposed": "transposed",
               "csd_student": "student"}
#: torch.compile's modes (True picks "max-autotune-no-cudagraphs").
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def method_terms(method: str) -> tuple[str, ...]:
    """The loss terms of `method`: a METHODS name, or "simplex" and/or "bct" joined to one with
    "+" (e.g. "simplex+fd": FD's terms with a simplex classifier; "bct+csd_official")."""
    parts = method.split("+")
    require(all(p in METHODS for p in parts) and len(set(parts)) == len(parts) and
            sum(p not in ("simplex", "bct") for p in parts) <= 1 and
            ("joint" not in parts or len(parts) == 1),
            f"unknown method {method!r}: choose one of {', '.join(METHODS)}, or join simplex "
            "and/or bct to one of them with '+' (e.g. simplex+fd)")
    return tuple(dict.fromkeys(t for p in parts for t in METHODS[p]))


def uses_teacher(method: str) -> bool:  # only then is a teacher built (bct: for its rows)
    return any(term in method_terms(method) for term in ("kd", "fd", "csd", "bct"))


@dataclass
class Config:
    """Everything that decides a run. Presets below: `quick`, `course` and `paper`."""

    dataset: str = "digits"
    data_root: str = "data"
    data_path: str | None = None  # imagefolder only
    image_size: int | None = None  # None: the dataset's default (16 for digits/glyphs, else 32)
    val_fraction: float = 0.1
    n_tasks: int = 5
    first_task: int | None = None  # classes in the first task; then `increment` per task
    increment: int | None = None
    class_order: str | list[int] = "icarl"
    depth: int = 8
    epochs: int = 30
    epochs_first: int | None = None  # None: same as `epochs`
    batch_size: int = 64
    lr_first: float = 1e-3
    lr_later: float = 1e-3
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = ()  # MultiStepLR epochs, restarted every task
    gamma: float = 0.1
    crop_pad: int = 2  # RandomCrop padding in pixels; 0 turns cropping off
    flip: bool = False  # horizontal flips (right for CIFAR, wrong for digits and letters)
    w_ce: float = 1.0
    w_triplet: float = 1.0
    w_kd: float = 1.0
    w_fd: float = 1.0
    w_csd: float = 1.0
    w_bct: float = 1.0
    triplet_margin: float = 1.0
    kd_temperature: float = 2.0
    csd_temperature: float = 0.07
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when present, else CPU
    # Speed knobs (see `speed_options`). True: on CUDA only, so CPU runs stay plain fp32;
    # "always": on any device, CPU included (how the tests check the fast path); False: off.
    bf16: bool | str = True  # bf16 autocast of the forward passes (losses stay fp32)
    channels_last: bool | str = True  # NHWC memory format: what tensor cores want for convs
    # CUDA only: torch.compile of the per-batch loss. True: "max-autotune-no-cudagraphs"; or one
    # of COMPILE_MODES ("reduce-overhead" adds CUDA graphs: fine, batches are static); False: off.
    compile: bool | str = False

    def replace(self, **changes) -> Config:  # a copy with `changes`
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        """Refuse settings that cannot train, with what to change (run() calls this first)."""
        def whole(name: str, lowest: int, none_ok: bool = False) -> None:
            v = getattr(self, name)
            integer = isinstance(v, int | np.integer) and not isinstance(v, bool)
            require((none_ok and v is None) or (integer and v >= lowest), f"{name} must be an "
                    f"integer >= {lowest}{' (or None)' if none_ok else ''}, got {v!r}")

        whole("epochs", 1)
        whole("depth", 8)
        whole("batch_size", 2)  # the triplet and CSD losses compare a batch's samples
        whole("epochs_first", 1, none_ok=True)
        whole("image_size", 4, none_ok=True)
        for name in ("lr_first", "lr_later", "kd_temperature", "csd_temperature"):
            require(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("bf16", "channels_last"):
            require(getattr(self, name) in (True, False, "always"), f"{name} must be True (CUDA "
                    f"only), 'always' or False, got {getattr(self, name)!r}")
        require(self.compile in (True, False, *COMPILE_MODES), "compile must be True, False or "
                f"one of {', '.join(COMPILE_MODES)} (it acts on CUDA only), got {self.compile!r}")


PRESETS: dict[str, Config] = {
    # The fastest look: digits at 16x16, ResNet-8, 5 tasks of 2 classes, seconds a task on a
    # CPU; later tasks at the validation-best rate and epochs (benchmarks/tune.py). Digits sit
    # near their ceiling (raw pixels retrieve almost as well as any model): little to forget.
    "quick": Config(lr_later=3e-4, epochs=20),
    # The course (the notebooks): glyphs, 5 tasks of 8 letters drawn by the seed, ResNet-8 at
    # 12x12. Later tasks at fine-tuning's best new-task rate on validation fonts (1e-3), three
    # times as long as the first: longer training is what makes it forget, as in the paper
    # (benchmarks/README.md, "The protocol"). channels_last: oneDNN's NHWC convs, ~1.1x here.
    # w_bct: BCT's weight by COMPAT_RULE on validation fonts (benchmarks/tune.py compatibility).
    "course": Config(dataset="glyphs", image_size=12, n_tasks=5, epochs_first=12, epochs=36,
                     lr_later=1e-3, class_order="seed", channels_last="always", w_bct=10.0),
    # The authors' CIFAR-100 protocol (csd-method.md): ResNet-32, 800 epochs a task, batch 128,
    # Adam 1e-3 then 1e-5, weight decay 5e-4, MultiStepLR 200/400/600, crop(4)+flip, all 50k
    # training images (val_fraction 0) as they did; never selected on test. Their class order
    # is the natural 0..99 (Avalanche sorts the class ids).
    "paper": Config(
        dataset="cifar100", n_tasks=2, depth=32, epochs=800, batch_size=128, lr_first=1e-3,
        lr_later=1e-5, weight_decay=5e-4, milestones=(200, 400, 600), gamma=0.1, crop_pad=4,
        flip=True, val_fraction=0.0, image_size=32, class_order="natural",
    ),
}
# The paper's schedule 16 times shorter (50 epochs a task, decays at 12/25/38), all else as the
# paper: for a free GPU session. Chosen by that rule alone, untuned (no CIFAR-100 here).
PRESETS["paper-short"] = PRESETS["paper"].replace(epochs=50, milestones=(12, 25, 38))


def preset(name: str, dataset: str | None = None) -> Config:
    """A preset's config, on another dataset if `dataset` is given."""
    require(name in PRESETS, f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name] if dataset is None else PRESETS[name].replace(dataset=dataset)


def resolve_device(device: str) -> torch.device:
    """"auto": CUDA when present, else the CPU; a CUDA device that is absent is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    require(not device.startswith("cuda") or torch.cuda.is_available(), f"device {device!r} "
            "asked for, but CUDA is not available here; use --device cpu (or auto)")
    return torch.device(device)


def speed_options(cfg: Config, device: torch.device) -> tuple[bool, bool, str | None]:
    """(bf16 autocast, channels_last, torch.compile mode or None) as they apply on `device`.
    bf16=True stays off before Ampere (e.g. Colab's T4: emulated bf16 is slower than fp32);
    compile stays off on a CPU (its compile time outweighs any gain there)."""
    cfg.check()
    cuda = device.type == "cuda"

    def on(value: bool | str) -> bool:
        return value == "always" or (value is True and cuda)

    native_bf16 = cuda and torch.cuda.get_device_capability(device) >= (8, 0)  # Ampere+
    bf16 = on(cfg.bf16) and (cfg.bf16 == "always" or native_bf16)
    mode = None
    if cfg.compile and not cuda:
        warnings.warn(f"compile={cfg.compile!r} acts on CUDA only: this run on {device} is not "
                      "compiled", stacklevel=2)
    elif cfg.compile:
        mode = "max-autotune-no-cudagraphs" if cfg.compile is True else cfg.compile
    return bf16, on(cfg.channels_last), mode


def precision(cfg: Config, device: torch.device) -> str:
    """The arithmetic a run uses on `device`, in words (part of where a run trained)."""
    if speed_options(cfg, device)[0]:
        return "bf16 autocast"
    if device.type == "cuda" and cfg.bf16 is True:
        return "fp32 (this GPU has no native bf16)"
    return "fp32"


def make_cuda_deterministic() -> None:
    """Same seed, same GPU, same numbers: cuDNN's deterministic kernels, no autotuning (it picks
    kernels by timing them), no TF32 (so "fp32" is fp32), torch's deterministic mode (warn_only:
    an op with no deterministic kernel warns). Costs some speed; not yet verified on a GPU."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)


# --------------------------------------------------------------------------------------------
# One task


def loss_terms(method: str, cfg: Config, logits: torch.Tensor, features: torch.Tensor,
               labels: torch.Tensor, teacher_logits: torch.Tensor | None,
               teacher_features: torch.Tensor | None, influence_logits: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
    """The method's loss terms for one batch, unweighted. Shapes: logits [B, C_seen],
    features [B, D], labels [B]; teacher outputs [B, C_old] and [B, D], None on task 1 or with
    nothing to distil; influence_logits [B, C_seen]: the student's features through BCT's old
    classifier, None on task 1. Each term is computed from its own inputs."""
    terms = {
        "ce": F.cross_entropy(logits, labels),
        "triplet": losses.triplet_loss(features, labels, margin=cfg.triplet_margin),
    }
    wanted = method_terms(method)
    if "bct" in wanted and influence_logits is not None:  # BCT, Eq. 3: new features must suit
        terms["bct"] = F.cross_entropy(influence_logits, labels)  # the old classifier (no teacher)
    if teacher_logits is None:
        return terms
    if "kd" in wanted:
        old = teacher_logits.shape[1]  # KD on the old classes only
        terms["kd"] = losses.kd_loss(logits[:, :old], teacher_logits, T=cfg.kd_temperature)
    if "fd" in wanted:
        terms["fd"] = losses.feature_distillation_loss(features, teacher_features)
    if "csd" in wanted:
        terms["csd"] = losses.csd_loss(features, teacher_features, labels,
                                       temperature=cfg.csd_temperature,
                                       variant=next(CSD_VARIANT[p] for p in method.split("+")
                                                    if p in CSD_VARIANT))
    return terms


def batch_loss(model: ResNet, teacher: ResNet | None, x: torch.Tensor, y: torch.Tensor,
               method: str, cfg: Config, bf16: bool = False,
               influence: CosineClassifier | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch: the student forward (with grad), the frozen teacher's (no grad) and the loss
    terms; returns (weighted loss, unweighted terms). x: normalised images [B, 3, H, W], y [B];
    bf16: autocast the forwards; influence: BCT's old classifier. `train_task` compiles this."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits, features = model(x)
        t_logits = t_features = None
        if teacher is not None:
            with torch.no_grad():
                t_logits, t_features = teacher(x)
    # Losses in fp32: normalisations and softmaxes at temperature 0.07 need the precision.
    terms = loss_terms(method, cfg, logits.float(), features.float(), y,
                       None if t_logits is None else t_logits.float(),
                       None if t_features is None else t_features.float(),
                       None if influence is None else influence(features.float()))
    weights = {"ce": cfg.w_ce, "triplet": cfg.w_triplet, "kd": cfg.w_kd, "fd": cfg.w_fd,
               "csd": cfg.w_csd, "bct": cfg.w_bct}
    loss = sum(weights[k] * v for k, v in terms.items())
    return loss, terms  # type: ignore[return-value]


def _compiled(mode: str | None):
    """batch_loss, compiled when `mode` says so, once per task: grow() replaced the classifier's
    Parameter, so the last task's graphs no longer fit; reset() drops them (which also keeps a
    10-task run under dynamo's recompile limit). dynamic=False: every batch has one shape."""
    if mode is None:
        return batch_loss
    torch._dynamo.reset()
    return torch.compile(batch_loss, mode=mode, dynamic=False)


def train_task(model: ResNet, teacher: ResNet | None, train: ImageSet, cfg: Config, method: str,
               mean, std, lr: float, epochs: int, seed: int, quiet: bool = False, desc: str = "",
               influence: CosineClassifier | None = None) -> list[dict[str, float]]:
    """Train `model` in place on one task's images with `method`; returns per-epoch mean losses.
    `train`: the task's images only (no exemplars), moved to the device once as uint8; crops,
    flips and normalisation run there per batch. influence: BCT's old classifier, for "bct"."""
    if not any(t in method_terms(method) for t in ("kd", "fd", "csd")):
        teacher = None  # bct alone needs no teacher forward per batch
    device = next(model.parameters()).device
    bf16, channels_last, compile_mode = speed_options(cfg, device)
    g = torch.Generator(device=device).manual_seed(seed)  # randperm and augment draw on-device
    images, labels = train.images.to(device), train.labels.to(device)
    mean, std = channel_stats(mean, std, device)  # once per task: no copy per batch
    if channels_last:
        # NHWC weights for both nets: a teacher loaded from a checkpoint is NCHW, and a format
        # mismatch would make every teacher conv convert its input.
        model = model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher = teacher.to(memory_format=torch.channels_last)
    # fused Adam on CUDA: one kernel updates every parameter (ResNet-32 has ~100 tensors).
    # None elsewhere, not False: an explicit False would also switch off the foreach default.
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay,
                                 fused=True if device.type == "cuda" else None)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.milestones), cfg.gamma)
    step_loss = _compiled(compile_mode)
    cuda_graphs = compile_mode in ("reduce-overhead", "max-autotune")
    model.train()
    history = []
    n = len(images)
    # drop the last, smaller batch (static shapes; no 1-sample BatchNorm) unless it is the only
    n_batches = max(1, n // cfg.batch_size)
    for epoch in progress_bar(range(epochs), quiet, desc=desc or "epochs"):
        order = torch.randperm(n, device=device, generator=g)
        sums: dict[str, torch.Tensor] = {}
        for b in range(n_batches):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            x = augment(images[idx], pad=cfg.crop_pad, flip=cfg.flip, generator=g)
            x = normalize(x, mean, std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # a new iteration: replay, not reuse
            loss, terms = step_loss(model, teacher, x, labels[idx], method, cfg, bf16, influence)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # Sum on the device (no per-batch .item(): that would make the CPU wait for the GPU
            # every batch). `0 + v` makes a new tensor: CUDA graphs reuse their output buffers.
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v.detach()
        schedule.step()
        means = (torch.stack(list(sums.values())) / n_batches).tolist()  # one sync per epoch
        history.append(dict(zip(sums, means, strict=True)))
        if not all(math.isfinite(v) for v in means):
            # A NaN/inf loss has already reached the weights: stop before anything is saved.
            raise FloatingPointError(
                f"{desc or 'training'}: the loss became non-finite in epoch {epoch + 1} "
                f"({', '.join(f'{k} {v:.4g}' for k, v in history[-1].items())}); the run "
                f"diverged. Lower the learning rate (lr={lr:g}) or the loss weights, or train "
                "in fp32 (--no-bf16); nothing of this task was saved."
            )
    return history


# --------------------------------------------------------------------------------------------
# A whole class-incremental run


@dataclass
class RunResult:
    method: str
    identity: dict  # what decides the numbers: config, method, data digest (see run_identity)
    class_order: list[int]
    increments: list[int]
    recall: list[list[float]] = field(default_factory=list)  # R[t][j]: task j after task t
    seen_recall: list[float] = field(default_factory=list)  # R@1 pooled over all seen classes
    seen_map: list[float] = field(default_factory=list)  # mAP over all seen classes
    accuracy: list[float] = field(default_factory=list)  # accuracy over seen classes
    old_accuracy: list[float] = field(default_factory=list)  # on earlier tasks' classes
    val_recall: list[list[float]] = field(default_factory=list)  # validation task matrix
    val_seen_recall: list[float] = field(default_factory=list)  # pooled, validation images
    seconds: list[float] = field(default_factory=list)  # training time per task
    # M[i][j]: model i's queries against model j's gallery of task 1's test images (the images
    # every model has seen): metrics.compatibility_matrix
    compatibility: list[list[float]] = field(default_factory=list)
    machine: str = ""  # where it trained, e.g. "cpu (..., AVX512, ...)"; see runs.machine
    precision: str = ""  # "fp32" or "bf16 autocast"

    def add(self, m: dict, seconds: float) -> None:
        """Append one task's metrics (from `evaluate`)."""
        saved_as = {"recall": "row", "val_recall": "val_row"}  # evaluate's (and checkpoints') keys
        for name in ("recall", "seen_recall", "seen_map", "accuracy", "old_accuracy",
                     "val_recall", "val_seen_recall"):
            getattr(self, name).append(m[saved_as.get(name, name)])
        self.seconds.append(seconds)

    @property
    def final_recall(self) -> float:
        """R@1 pooled over every seen class's test images after the last task."""
        return self.seen_recall[-1]

    @property
    def task_average_recall(self) -> float:
        """The paper's "Average": the mean over tasks of R@1 within each task's classes (the
        last row of the task matrix), after the last task."""
        return float(np.nanmean(np.asarray(self.recall[-1], dtype=float)))

    @property
    def first_task_recall(self) -> float:
        """R@1 within the first task's classes after the last task (the paper's first column)."""
        return self.recall[-1][0]

    def to_json(self) -> dict:
        """Every field, plus the summaries the reports use: task_avg_R@1 (the paper's Average)
        and pooled_R@1 after the last task, AC and AM of the compatibility matrix."""
        return {**asdict(self), "task_avg_R@1": self.task_average_recall,
                "pooled_R@1": self.final_recall,
                "AC": metrics.average_compatibility(self.compatibility),
                "AM": metrics.average_multimodel_accuracy(self.compatibility)}


def _task_row(feats: torch.Tensor, labels: torch.Tensor, split: TaskSplit, task: int) -> list:
    """R@1 within each task's classes (NaN for tasks not seen yet): a row of the task matrix."""
    task_of = torch.as_tensor(split.task_of_label(), device=labels.device)[labels]
    return [metrics.recall_at_k(feats[task_of == j], labels[task_of == j], k=1) if j <= task
            else float("nan") for j in range(split.n_tasks)]


@torch.no_grad()
def evaluate(model: ResNet, data: Dataset, split: TaskSplit, task: int) -> dict:
    """Metrics after training `task` (tasks 0..task seen): test, and validation for tuning."""
    seen = split.seen(task)
    test = data.test.of_classes(range(seen))
    feats, logits = extract(model, test.images, data.mean, data.std)
    labels = test.labels.to(feats.device)
    preds = logits[:, :seen].argmax(1)
    old = labels < split.offsets[task]
    nan = float("nan")
    out = {"row": _task_row(feats, labels, split, task),
           "seen_recall": metrics.recall_at_k(feats, labels, k=1),
           "seen_map": metrics.mean_average_precision(feats, labels),
           "accuracy": (preds == labels).float().mean().item(),
           "old_accuracy": (preds[old] == labels[old]).float().mean().item() if old.any() else nan,
           "val_row": [nan] * split.n_tasks, "val_seen_recall": nan}
    val = data.val.of_classes(range(seen))
    if len(val) > 1:
        vf, _ = extract(model, val.images, data.mean, data.std)
        out["val_row"] = _task_row(vf, val.labels.to(vf.device), split, task)
        out["val_seen_recall"] = metrics.recall_at_k(vf, val.labels.to(vf.device), k=1)
    return out


def prepare(cfg: Config) -> tuple[Dataset, TaskSplit]:
    """Load the dataset, cut it into tasks and relabel it in class order. Memoised on what it
    reads of cfg: a notebook asks for the same data dozens of times (each ~0.1 s), so callers
    share the tensors and must not modify them in place."""
    order = cfg.class_order if isinstance(cfg.class_order, str) else tuple(cfg.class_order)
    return _prepare(cfg.dataset, cfg.data_root, cfg.image_size, cfg.seed, cfg.val_fraction,
                    cfg.data_path, cfg.n_tasks, cfg.first_task, cfg.increment, order)


@functools.lru_cache(maxsize=4)
def _prepare(dataset, root, size, seed, val_fraction, path, n_tasks, first, increment, order):
    data = load_dataset(dataset, root, size, seed=seed, val_fraction=val_fraction, path=path)
    split = make_split(data.n_classes, n_tasks, first, increment, order, seed)  # a tuple will do
    return data.relabel(split.class_order), split


def _trained_already(ckpt: Path | None, step: int, first_task, method: str) -> Path | None:
    """The checkpoint that holds this step already: the run's own, or a shared first task."""
    if ckpt is not None and ckpt.exists():
        return ckpt
    if step == 0 and first_task is not None:
        if method == "joint":
            raise ValueError("joint trains all classes at once: it has no first task to share")
        return Path(first_task)
    return None


def run(cfg: Config, method: str, out_dir: str | Path | None = None, quiet: bool = False,
        data: tuple[Dataset, TaskSplit] | None = None, first_task: str | Path | None = None,
        resume_anywhere: bool = False, last_task: int | None = None) -> RunResult:
    """Train `method` task after task and evaluate after each task.

    With `out_dir`, `task{t}.pt` (weights, identity, metrics) is saved after each task, before
    it is evaluated; a rerun resumes after the last finished task. Another run's folder is
    refused, never overwritten; so is one from another machine or precision, unless
    `resume_anywhere`. first_task: a `task0.pt` with the same data and config up to
    runs.LATER_TASKS_ONLY (one serves every method but joint, and simplex its own kind).
    last_task: stop after this task (0-based); a later call without it resumes from there."""
    method_terms(method)  # a clear error for an unknown method
    cfg.check()
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        make_cuda_deterministic()
    data, split = data if data is not None else prepare(cfg)
    identity = run_identity(cfg, method, data)
    trained_on = {"machine": machine(device), "precision": precision(cfg, device)}
    # joint: one "task" holding every class (the upper bound), evaluated on every task's classes.
    steps = [list(range(data.n_classes))] if method == "joint" else [
        split.classes(t) for t in range(split.n_tasks)]
    if last_task is not None:
        require(isinstance(last_task, int | np.integer) and 0 <= last_task < len(steps),
                f"last_task must be a task index 0..{len(steps) - 1}, got {last_task!r}")
        steps = steps[: last_task + 1]
    out = Path(out_dir) if out_dir is not None else None
    result = RunResult(method, identity, split.class_order, split.increments, **trained_on)
    first_test, first_features = data.test.of_classes(split.classes(0)), []
    torch.manual_seed(cfg.seed)
    simplex = "simplex" in method.split("+")  # then an output per class from task 1 on
    model = resnet(cfg.depth, data.n_classes if simplex else len(steps[0]), simplex).to(device)
    for step, classes in enumerate(progress_bar(steps, quiet, desc=f"{method}: tasks")):
        ckpt = out / f"task{step}.pt" if out is not None else None
        source = _trained_already(ckpt, step, first_task, method)
        if source is not None:
            model, saved = resume(source, identity, trained_on, resume_anywhere, device,
                                  shared_first=source != ckpt)
            seconds, m = saved["seconds"], json.loads(saved["metrics"] or "null")
        else:
            teacher, influence, task = None, None, data.train.of_classes(classes)
            if step > 0:
                if uses_teacher(method):
                    teacher = copy.deepcopy(model).eval().requires_grad_(False)  # frozen
                if "bct" in method_terms(method):
                    influence = models.influence_classifier(teacher, task, data.mean, data.std)
                torch.manual_seed(cfg.seed * 1000 + step)  # new rows' init, the same on resume
                if not simplex:
                    model.classifier.grow(len(classes))
            start = time.perf_counter()
            train_task(model, teacher, task, cfg, method, data.mean, data.std,
                       lr=cfg.lr_first if step == 0 else cfg.lr_later,
                       epochs=(cfg.epochs_first or cfg.epochs) if step == 0 else cfg.epochs,
                       seed=cfg.seed * 1000 + step, quiet=quiet,
                       desc=f"{method} task {step + 1}", influence=influence)
            seconds, m = time.perf_counter() - start, None
        info = {"depth": cfg.depth, "n_classes": model.n_classes, "simplex": simplex, "task": step,
                "method": method, "identity": json.dumps(identity), "seconds": seconds,
                "class_order": split.class_order, "increments": split.increments, **trained_on}
        if ckpt is not None and source != ckpt:
            save_checkpoint(ckpt, model, {**info, "metrics": json.dumps(m)})  # before evaluating
        if m is None:
            m = evaluate(model, data, split, split.n_tasks - 1 if method == "joint" else step)
            if ckpt is not None:
                save_checkpoint(ckpt, model, {**info, "metrics": json.dumps(m)})
        result.add(m, seconds)
        first_features.append(extract(model, first_test.images, data.mean, data.std)[0])
    result.compatibility = metrics.compatibility_matrix(first_features, first_test.labels).tolist()
    if out is not None and len(steps) == (1 if method == "joint" else split.n_tasks):
        write_json(out / "result.json", result.to_json())  # only a finished run has one
    return result
