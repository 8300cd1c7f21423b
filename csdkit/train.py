"""Training: one config, one function per task, one function for a whole class-incremental run.

The objective for task t (Barletti et al. 2021; see csdkit.losses for each term):

    finetune      L = CE + Triplet                       (the lower bound)
    lwf           L = CE + Triplet + KD                   (Learning without Forgetting)
    fd            L = CE + Triplet + KD + FD              (+ L2 feature distillation)
    csd           L = CE + Triplet + KD + CSD             (the paper's Eq. 8: teacher anchors)
    csd_official  L = CE + Triplet + KD + CSD(official)   (the authors' SupCon-over-two-views form)
    joint         L = CE + Triplet on all classes at once (the upper bound)

and two ablations of CSD (benchmarks/ablate_csd.py): csd_transposed (student anchors against the
teacher's features: csd_official without its student-student terms) and csd_student (those
student-student terms alone: SupCon on the student, no teacher features).

The distillation terms need a teacher: the model as it was at the end of the previous task,
frozen: a copy in eval mode (BatchNorm uses its running statistics and never updates them) run
under no_grad. The authors' code left its teacher in train mode; we do not copy that.

No checkpoint is ever chosen by a test score: each task keeps its last epoch. Test metrics are
computed after each task for the report only.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from csdkit import losses, metrics
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
from csdkit.models import ResNet, resnet

METHODS = {
    "finetune": ("ce", "triplet"),
    "lwf": ("ce", "triplet", "kd"),
    "fd": ("ce", "triplet", "kd", "fd"),
    "csd": ("ce", "triplet", "kd", "csd"),
    "csd_official": ("ce", "triplet", "kd", "csd"),
    "csd_transposed": ("ce", "triplet", "kd", "csd"),
    "csd_student": ("ce", "triplet", "kd", "csd"),
    "joint": ("ce", "triplet"),
}
#: Which form of csdkit.losses.csd_loss each CSD method trains with.
CSD_VARIANT = {"csd": "paper", "csd_official": "official", "csd_transposed": "transposed",
               "csd_student": "student"}


def uses_teacher(method: str) -> bool:
    """Whether `method` distils from the previous model (only then is a teacher built and run)."""
    return any(term in METHODS[method] for term in ("kd", "fd", "csd"))


@dataclass
class Config:
    """Everything that decides a run. Two presets below: `quick` and `paper`."""

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
    triplet_margin: float = 1.0
    kd_temperature: float = 2.0
    csd_temperature: float = 0.07
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when present, else CPU
    # Speed knobs (see `speed_options`). True: on CUDA only, so CPU runs stay plain fp32;
    # "always": on any device, CPU included (how the tests check the fast path); False: off.
    bf16: bool | str = True  # bf16 autocast of the forward passes (losses stay fp32)
    channels_last: bool | str = True  # NHWC memory format: what tensor cores want for convs
    # CUDA only. torch.compile of the per-batch loss (student + teacher forwards and losses).
    # True: mode "max-autotune-no-cudagraphs"; "reduce-overhead" adds CUDA graphs (fine: the
    # batches are static-shaped, drop_last); any other torch.compile mode string; False: off.
    compile: bool | str = False

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        """Refuse settings that cannot train, with what to change (run() calls this first)."""
        for name in ("epochs", "batch_size", "depth"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.epochs_first is not None and self.epochs_first < 1:
            raise ValueError(f"epochs_first must be >= 1 (or None), got {self.epochs_first}")
        for name in ("lr_first", "lr_later", "kd_temperature", "csd_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2: the triplet and CSD losses compare the "
                             "samples of a batch with each other")


PRESETS: dict[str, Config] = {
    # The fastest look: digits at 16x16, ResNet-8, 5 tasks of 2 classes, seconds a task on a
    # CPU. Later tasks learn gently from the previous model (the spirit of the authors' 1e-3
    # then 1e-5) at the rate and epochs that `python benchmarks/tune.py quick` chose on
    # validation data (benchmarks/results/tune-quick.json). Digits sit near their ceiling (raw
    # pixels retrieve almost as well as any model), so little is forgotten here.
    "quick": Config(lr_later=3e-4, epochs=20),
    # The course: what the notebooks use, chosen so that forgetting and what reduces it are
    # visible. glyphs (40 letters, test fonts never seen in training), 5 tasks of 8 letters,
    # ResNet-8 at 12x12; the seed draws which letters go to which task. A later-task rate high
    # enough that fine-tuning really overwrites the previous model: `python benchmarks/tune.py
    # course` (at 16 px, and with --image-size 12) picked the setting with the least training
    # time that meets every teaching threshold on the validation fonts
    # (benchmarks/results/tune-course.json, tune-course-12px.json).
    "course": Config(dataset="glyphs", image_size=12, n_tasks=5, epochs=12, lr_later=1e-2,
                     class_order="seed"),
    # The authors' CIFAR-100 protocol (csd-method.md): ResNet-32, 800 epochs a task, batch 128,
    # Adam 1e-3 then 1e-5, weight decay 5e-4, MultiStepLR 200/400/600, crop(4)+flip. We train on
    # all 50k training images (val_fraction 0) as they did, and never select on test. Their class
    # order is the natural 0..99 (Avalanche sorts the class ids); --class-order icarl is the
    # literature's other common order.
    "paper": Config(
        dataset="cifar100", n_tasks=2, depth=32, epochs=800, batch_size=128, lr_first=1e-3,
        lr_later=1e-5, weight_decay=5e-4, milestones=(200, 400, 600), gamma=0.1, crop_pad=4,
        flip=True, val_fraction=0.0, image_size=32, class_order="natural",
    ),
}


def preset(name: str, dataset: str | None = None) -> Config:
    """A preset's config, on another dataset if `dataset` is given."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name] if dataset is None else PRESETS[name].replace(dataset=dataset)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; "
                         "use --device cpu (or auto)")
    return torch.device(device)


def speed_options(cfg: Config, device: torch.device) -> tuple[bool, bool, str | None]:
    """(bf16 autocast, channels_last, torch.compile mode or None) as they apply on `device`.

    True means "on CUDA only", so the defaults leave a CPU run plain fp32 (bf16 changes the
    numbers, and its speed on a CPU depends on the CPU having bf16 instructions); "always" turns
    bf16 / channels_last on for any device; compile only ever acts on CUDA (on a CPU, inductor's
    C++ compile time would outweigh any gain). bf16=True also stays off on a GPU older than
    Ampere (compute capability < 8.0, e.g. Colab's T4), which has no bf16 arithmetic: torch
    would emulate it, slower than fp32. `precision` says which was chosen.
    """
    cuda = device.type == "cuda"
    for name in ("bf16", "channels_last"):
        if getattr(cfg, name) not in (True, False, "always"):
            raise ValueError(f"{name} must be True (CUDA only), 'always' or False, "
                             f"got {getattr(cfg, name)!r}")

    def on(value: bool | str) -> bool:
        return value == "always" or (value is True and cuda)

    bf16 = on(cfg.bf16) and (cfg.bf16 == "always" or native_bf16(device))
    mode = None
    if cfg.compile and cuda:
        mode = "max-autotune-no-cudagraphs" if cfg.compile is True else str(cfg.compile)
    return bf16, on(cfg.channels_last), mode


def native_bf16(device: torch.device) -> bool:
    """A CUDA device with bf16 arithmetic (Ampere or newer); False for CPUs."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def precision(cfg: Config, device: torch.device) -> str:
    """The arithmetic a run uses on `device`, in words (part of a run's identity on resume)."""
    if speed_options(cfg, device)[0]:
        return "bf16 autocast"
    if device.type == "cuda" and cfg.bf16 is True:
        return "fp32 (this GPU has no native bf16)"
    return "fp32"


def quiet_by_default() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def progress_bar(iterable, quiet: bool, **kwargs):
    """tqdm.auto: a widget in Jupyter, a text bar in a terminal, nothing when quiet or on CI."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=quiet or quiet_by_default(), leave=False, **kwargs)


# --------------------------------------------------------------------------------------------
# Features


@torch.no_grad()
def extract(
    model: ResNet, images: torch.Tensor, mean, std, batch_size: int = 512, quiet: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode features [N, 64] and logits [N, C] for uint8 images [N, 3, H, W], on the
    model's device. The model's train/eval mode is restored afterwards. quiet=False shows a
    progress bar (worth it for big galleries)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mean, std = channel_stats(mean, std, device)
    feats, logits = [], []
    for i in progress_bar(range(0, len(images), batch_size), quiet, desc="features"):
        x = normalize(images[i : i + batch_size].to(device), mean, std)
        z, f = model(x)
        feats.append(f.float())
        logits.append(z.float())
    model.train(was_training)
    return torch.cat(feats), torch.cat(logits)


# --------------------------------------------------------------------------------------------
# One task


def loss_terms(
    method: str,
    cfg: Config,
    logits: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    teacher_features: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """The method's loss terms for one batch, unweighted. Shapes: logits [B, C_seen],
    features [B, D], labels [B]; teacher outputs [B, C_old] and [B, D] or None on task 1."""
    terms = {
        "ce": F.cross_entropy(logits, labels),
        "triplet": losses.triplet_loss(features, labels, margin=cfg.triplet_margin),
    }
    if teacher_logits is None:
        return terms
    wanted = METHODS[method]
    if "kd" in wanted:
        old = teacher_logits.shape[1]  # KD on the old classes only
        terms["kd"] = losses.kd_loss(logits[:, :old], teacher_logits, T=cfg.kd_temperature)
    if "fd" in wanted:
        terms["fd"] = losses.feature_distillation_loss(features, teacher_features)
    if "csd" in wanted:
        terms["csd"] = losses.csd_loss(features, teacher_features, labels,
                                       temperature=cfg.csd_temperature,
                                       variant=CSD_VARIANT[method])
    return terms


def batch_loss(
    model: ResNet,
    teacher: ResNet | None,
    x: torch.Tensor,
    y: torch.Tensor,
    method: str,
    cfg: Config,
    bf16: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch: the student forward (with grad), the frozen teacher's forward (no grad) and the
    method's loss terms. Returns (weighted loss, unweighted terms). x: normalised images
    [B, 3, H, W], y: labels [B]; bf16: autocast the forwards to bf16 on x's device. This is the
    function `train_task` compiles."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits, features = model(x)
        t_logits = t_features = None
        if teacher is not None:
            with torch.no_grad():
                t_logits, t_features = teacher(x)
    # Losses in fp32: normalisations and softmaxes at temperature 0.07 need the precision.
    terms = loss_terms(method, cfg, logits.float(), features.float(), y,
                       None if t_logits is None else t_logits.float(),
                       None if t_features is None else t_features.float())
    weights = {"ce": cfg.w_ce, "triplet": cfg.w_triplet, "kd": cfg.w_kd, "fd": cfg.w_fd,
               "csd": cfg.w_csd}
    loss = sum(weights[k] * v for k, v in terms.items())
    return loss, terms  # type: ignore[return-value]


def train_task(
    model: ResNet,
    teacher: ResNet | None,
    train: ImageSet,
    cfg: Config,
    method: str,
    mean,
    std,
    lr: float,
    epochs: int,
    seed: int,
    quiet: bool = False,
    desc: str = "",
) -> list[dict[str, float]]:
    """Train `model` in place on one task's images with `method`; returns per-epoch mean losses.

    `train` holds only the current task's images (no exemplars of old classes). The images move
    to the model's device once, as uint8; crops, flips and normalisation run there per batch.
    """
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
    step_loss = batch_loss
    if compile_mode is not None:
        # Compiled once per task: grow() replaced the classifier's Parameter by a bigger one, so
        # the last task's graphs no longer fit (one recompile per task, by design). reset() drops
        # them, which also keeps a 10-task run under dynamo's recompile limit. dynamic=False:
        # every batch has the same shape (drop_last), which CUDA graphs need anyway.
        torch._dynamo.reset()
        step_loss = torch.compile(batch_loss, mode=compile_mode, dynamic=False)
    cuda_graphs = compile_mode in ("reduce-overhead", "max-autotune")
    model.train()
    history = []
    n = len(images)
    # drop the last, smaller batch (static shapes for compiled steps; no 1-sample BatchNorm)
    # unless the whole task is smaller than one batch.
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
            loss, terms = step_loss(model, teacher, x, labels[idx], method, cfg, bf16)
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
# Checkpoints


def save_checkpoint(path: Path, model: ResNet, meta: dict) -> None:
    """Write atomically: a temp file beside the target, then os.replace (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"model": state, **meta}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, model: ResNet | None = None) -> tuple[ResNet, dict]:
    """Load a csdkit checkpoint (weights_only=True). Builds the model it describes, or checks
    that `model` has the same architecture and class count and loads into it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in ("model", "depth", "n_classes") if not isinstance(ckpt, dict) or
               k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a csdkit checkpoint (no {', '.join(map(repr, missing))} "
                         "entries); csdkit writes them with save_checkpoint or `csdkit run`")
    depth, n_classes = int(ckpt["depth"]), int(ckpt["n_classes"])
    if model is None:
        model = resnet(depth, n_classes)
    elif model.depth != depth or model.n_classes != n_classes:
        raise ValueError(
            f"{path} holds a ResNet-{depth} with {n_classes} classes, but the model given is a "
            f"ResNet-{model.depth} with {model.n_classes} classes; build the model with "
            f"resnet({depth}, {n_classes}) or call load_checkpoint(path) without a model"
        )
    model.load_state_dict(ckpt["model"])
    return model, {k: v for k, v in ckpt.items() if k != "model"}


# --------------------------------------------------------------------------------------------
# A whole class-incremental run


@dataclass
class RunResult:
    method: str
    identity: dict  # what decides the numbers: config, method, data digest (see run_identity)
    class_order: list[int]
    increments: list[int]
    recall: list[list[float]]  # R[t][j]: R@1 on task j's test classes after task t (NaN: unseen)
    seen_recall: list[float]  # R@1 pooled over all seen classes' test images after each task
    seen_map: list[float]  # mAP over all seen classes' test images after each task
    accuracy: list[float]  # classification accuracy over seen classes after each task
    old_accuracy: list[float]  # accuracy on the previous tasks' classes (NaN after task 1)
    val_recall: list[list[float]]  # the task matrix on the validation split (tuning only)
    val_seen_recall: list[float]  # R@1 pooled over the seen classes' validation images
    seconds: list[float] = field(default_factory=list)  # training time per task
    machine: str = ""  # where it trained, e.g. "cpu (AVX512)"; see `machine`
    precision: str = ""  # "fp32" or "bf16 autocast"

    @property
    def final_recall(self) -> float:
        """R@1 pooled over every seen class's test images after the last task."""
        return self.seen_recall[-1]

    @property
    def task_average_recall(self) -> float:
        """The paper's "Average": the mean over tasks of R@1 within each task's classes (the
        last row of the task matrix), after the last task."""
        return nanmean(self.recall[-1])

    @property
    def first_task_recall(self) -> float:
        """R@1 within the first task's classes after the last task (the paper's first column)."""
        return self.recall[-1][0]

    def to_json(self) -> dict:
        """Every field, plus the two summaries after the last task under the names the reports
        use: task_avg_R@1 (the paper's Average) and pooled_R@1."""
        return {**asdict(self), "task_avg_R@1": self.task_average_recall,
                "pooled_R@1": self.final_recall}


def run_identity(cfg: Config, method: str, data: Dataset) -> dict:
    """Everything that decides a run's numbers: the config (less the device and speed knobs,
    which `run` checks apart, and less where the data live), the method and the data themselves
    (`Dataset.digest`: every image and label, in class order). Two runs with equal identities
    compute the same thing; a checkpoint is resumed only into a run with its identity."""
    d = asdict(cfg)
    for k in ("device", "bf16", "channels_last", "compile", "data_root", "data_path"):
        d.pop(k)
    d["milestones"] = list(d["milestones"])
    return json.loads(json.dumps({**d, "method": method, "data": data.digest()}))


def run_id(identity: dict) -> str:
    """8 hex digits naming an identity, for folder names (e.g. runs/<dataset>-<method>-<id>)."""
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]


def run_name(cfg: Config, method: str, data: Dataset) -> str:
    """The folder name of a run: <dataset>-<method>-seed<seed>-<run_id of its identity>."""
    return f"{cfg.dataset}-{method}-seed{cfg.seed}-{run_id(run_identity(cfg, method, data))}"


def machine(device: torch.device) -> str:
    """The device a run trains on, as its last digits depend on it: the GPU's name; or the
    CPU's name, ATen's vector instruction set and `arithmetic()`, which also tells the
    instruction set oneDNN picked for the convolutions (ONEDNN_MAX_CPU_ISA can cap it)."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return (f"cpu ({cpu_name()}, {torch.backends.cpu.get_cpu_capability()}, arithmetic "
            f"{arithmetic()})")


@functools.cache
def arithmetic() -> str:
    """8 hex digits of what a training step computes on this CPU: the bits of a ResNet-8's
    gradients on a fixed batch, with one thread. Settings that compute the same (an AVX2 CPU,
    or an AVX-512 one capped at AVX2 the same way) share it; any change of instruction set,
    library or torch release that changes the numbers changes it."""
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


def cache_folder(root: str | Path, device: torch.device) -> Path:
    """root/torch<version>-<8 hex digits of `machine`>: the run cache of this machine. Runs are
    named by their identity inside it (run_grid), so every tool can share it; a machine of
    other arithmetic (another CPU, an emulated one, another torch) gets a cache of its own."""
    return Path(root) / f"torch{torch.__version__.split('+')[0]}-{run_id({'m': machine(device)})}"


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    out = {
        "row": _task_row(feats, labels, split, task),
        "seen_recall": metrics.recall_at_k(feats, labels, k=1),
        "seen_map": metrics.mean_average_precision(feats, labels),
        "accuracy": (preds == labels).float().mean().item(),
        "old_accuracy": (preds[old] == labels[old]).float().mean().item() if old.any() else
        float("nan"),
        "val_row": [float("nan")] * split.n_tasks,
        "val_seen_recall": float("nan"),
    }
    val = data.val.of_classes(range(seen))
    if len(val) > 1:
        vf, _ = extract(model, val.images, data.mean, data.std)
        out["val_row"] = _task_row(vf, val.labels.to(vf.device), split, task)
        out["val_seen_recall"] = metrics.recall_at_k(vf, val.labels.to(vf.device), k=1)
    return out


def prepare(cfg: Config) -> tuple[Dataset, TaskSplit]:
    """Load the dataset, cut it into tasks and relabel it in class order."""
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.image_size, seed=cfg.seed,
                        val_fraction=cfg.val_fraction, path=cfg.data_path)
    split = make_split(data.n_classes, cfg.n_tasks, cfg.first_task, cfg.increment,
                       cfg.class_order, cfg.seed)
    return data.relabel(split.class_order), split


def run(
    cfg: Config,
    method: str,
    out_dir: str | Path | None = None,
    quiet: bool = False,
    data: tuple[Dataset, TaskSplit] | None = None,
    first_task: str | Path | None = None,
    resume_anywhere: bool = False,
    last_task: int | None = None,
) -> RunResult:
    """Train `method` task after task and evaluate after each task.

    With `out_dir`, a checkpoint `task{t}.pt` is written after each task (weights, identity,
    metrics) and a rerun resumes after the last finished task. A folder holding another run's
    checkpoints (another config, method or data) is refused, never overwritten; so is one
    trained on another machine or precision, unless `resume_anywhere` says that mixing them is
    fine. Each task's weights are saved before it is evaluated, so a crash in evaluation costs
    only the evaluation.

    first_task: a `task0.pt` of another run with the same data and config, up to the method and
    the settings of LATER_TASKS_ONLY: every method but joint trains the first task identically
    (CE + triplet, same seed), so one first task can serve them all. It is copied into
    `out_dir` and this run goes on from it.
    last_task: stop after this task (0-based; the result then holds rows 0..last_task only);
    a later call without it resumes from there.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    cfg.check()
    device = resolve_device(cfg.device)
    data, split = data if data is not None else prepare(cfg)
    identity = run_identity(cfg, method, data)
    where = {"machine": machine(device), "precision": precision(cfg, device)}
    out = Path(out_dir) if out_dir is not None else None

    # joint: one "task" holding every class (the upper bound), evaluated on every task's classes.
    steps = [list(range(data.n_classes))] if method == "joint" else [
        split.classes(t) for t in range(split.n_tasks)]
    steps = steps[: None if last_task is None else last_task + 1]
    result = RunResult(method, identity, split.class_order, split.increments,
                       [], [], [], [], [], [], [], [], **where)
    torch.manual_seed(cfg.seed)
    model = resnet(cfg.depth, len(steps[0])).to(device)
    for step, classes in enumerate(progress_bar(steps, quiet, desc=f"{method}: tasks")):
        task = split.n_tasks - 1 if method == "joint" else step  # tasks seen after this step
        ckpt_path = out / f"task{step}.pt" if out is not None else None
        meta = {"depth": cfg.depth, "method": method, "task": step,
                "identity": json.dumps(identity), "class_order": split.class_order,
                "increments": split.increments, **where}
        source = ckpt_path if ckpt_path is not None and ckpt_path.exists() else None
        if source is None and step == 0 and first_task is not None:
            if method == "joint":
                raise ValueError("joint trains all classes at once: it has no first task to share")
            source = Path(first_task)
        if source is not None:  # resume: this task is trained already
            model, saved = _resume(source, identity, where, resume_anywhere, device,
                                   any_method=source != ckpt_path)
            seconds, m = saved["seconds"], json.loads(saved["metrics"] or "null")
        else:
            teacher = None
            if step > 0:
                if uses_teacher(method):
                    teacher = copy.deepcopy(model).eval().requires_grad_(False)
                torch.manual_seed(cfg.seed * 1000 + step)  # new rows' init, the same on resume
                model.classifier.grow(len(classes))
            start = time.perf_counter()
            train_task(
                model, teacher, data.train.of_classes(classes), cfg, method, data.mean, data.std,
                lr=cfg.lr_first if step == 0 else cfg.lr_later,
                epochs=(cfg.epochs_first or cfg.epochs) if step == 0 else cfg.epochs,
                seed=cfg.seed * 1000 + step, quiet=quiet, desc=f"{method} task {step + 1}",
            )
            seconds, m = time.perf_counter() - start, None
        meta.update(n_classes=model.n_classes, seconds=seconds)
        if ckpt_path is not None and source != ckpt_path:
            save_checkpoint(ckpt_path, model, {**meta, "metrics": json.dumps(m)})  # before eval
        if m is None:
            m = evaluate(model, data, split, task)
            if ckpt_path is not None:
                save_checkpoint(ckpt_path, model, {**meta, "metrics": json.dumps(m)})
        _append(result, m, seconds)
    if out is not None:
        write_json(out / "result.json", result.to_json())
    return result


#: Settings that act only from the second task on: runs that differ only in these (and in the
#: method, joint aside) train the same first task, so `run_grid` trains it once for all.
LATER_TASKS_ONLY = ("method", "lr_later", "w_kd", "w_fd", "w_csd", "kd_temperature",
                    "csd_temperature")


def _run_job(job: dict) -> RunResult:
    torch.set_num_threads(1)
    return run(**job)


def _run_parallel(jobs: list[dict], workers: int) -> list[RunResult]:
    """run(**job) for every job, `workers` at a time in spawned processes (safe on every OS)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if workers <= 1 or len(jobs) <= 1:
        threads = torch.get_num_threads()
        try:
            return [_run_job(job) for job in jobs]
        finally:
            torch.set_num_threads(threads)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
        return list(pool.map(_run_job, jobs))


def first_name(cfg: Config, data: Dataset) -> str:
    """The folder name of the first task shared by the runs that differ from `cfg` only in
    LATER_TASKS_ONLY (see run_grid)."""
    ident = run_identity(cfg, "finetune", data)
    shared = {k: v for k, v in ident.items() if k not in LATER_TASKS_ONLY}
    return f"{cfg.dataset}-first-seed{cfg.seed}-{run_id(shared)}"


def run_grid(runs: list[tuple[Config, str]], folder: str | Path, workers: int = 2,
             first_only: bool = False) -> list[RunResult]:
    """Train (config, method) pairs, `workers` at a time, one torch thread each, and return
    their results in order. On a CPU a run's last digits depend on its thread count, so the
    numbers never depend on `workers`.

    Each run gets folder/<run_name>/ and is resumed from there (a finished one only loads).
    Runs that differ only in LATER_TASKS_ONLY share one first task, trained once into
    folder/<first_name>/. first_only: train just those first tasks, and return their results.

    With workers > 1 the runs train in spawned processes, which import the calling script
    again: call this from a notebook, or from a script under `if __name__ == "__main__":`.
    """
    folder = Path(folder)
    data: dict[str, tuple[Dataset, TaskSplit]] = {}  # by repr: configs are not hashable
    for cfg, _ in runs:
        if repr(cfg) not in data:
            data[repr(cfg)] = prepare(cfg)
    plans = [{"cfg": cfg, "method": method, "quiet": True,
              "out_dir": folder / run_name(cfg, method, data[repr(cfg)][0]),
              "first": folder / first_name(cfg, data[repr(cfg)][0])} for cfg, method in runs]
    todo = [p for p in plans if not (p["out_dir"] / "result.json").exists() or first_only]
    firsts = {p["first"]: p["cfg"] for p in todo if p["method"] != "joint"}
    first_job = {"method": "finetune", "last_task": 0, "quiet": True}
    _run_parallel([{"cfg": cfg, "out_dir": path, **first_job} for path, cfg in firsts.items()
                   if not (path / "task0.pt").exists()], workers)
    if first_only:
        return [run(p["cfg"], out_dir=p["first"], data=data[repr(p["cfg"])], **first_job)
                for p in plans]
    _run_parallel([{k: v for k, v in p.items() if k != "first"} |
                   ({} if p["method"] == "joint" else {"first_task": p["first"] / "task0.pt"})
                   for p in todo], workers)
    return [run(p["cfg"], p["method"], p["out_dir"], quiet=True, data=data[repr(p["cfg"])])
            for p in plans]  # all trained now: this only loads


def _append(result: RunResult, m: dict, seconds: float) -> None:
    result.recall.append(m["row"])
    result.seen_recall.append(m["seen_recall"])
    result.seen_map.append(m["seen_map"])
    result.accuracy.append(m["accuracy"])
    result.old_accuracy.append(m["old_accuracy"])
    result.val_recall.append(m["val_row"])
    result.val_seen_recall.append(m["val_seen_recall"])
    result.seconds.append(seconds)


def _resume(path: Path, identity: dict, where: dict, anywhere: bool, device: torch.device,
            any_method: bool = False) -> tuple[ResNet, dict]:
    """Load a finished task's checkpoint after checking that it belongs to this run."""
    model, meta = load_checkpoint(path)
    saved = json.loads(meta.get("identity", "{}"))
    if any_method:  # a shared first task: all but what acts on later tasks must agree
        if meta.get("task") != 0 or saved.get("method") == "joint":
            raise ValueError(f"{path} is not a first-task checkpoint of a continual method")
        saved = {**saved, **{k: identity[k] for k in LATER_TASKS_ONLY}}
    if saved != identity:
        diff = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        raise ValueError(
            f"{path} belongs to another run (differs in: {', '.join(diff) or 'everything'}; "
            f"'data' means other images, labels or class order). Nothing was overwritten: "
            f"choose another output folder, or delete {path.parent} to start afresh."
        )
    theirs = {k: meta.get(k) for k in where}
    if theirs != where and not anywhere:
        raise ValueError(
            f"{path} was trained on {theirs['machine']} in {theirs['precision']}, this run is "
            f"on {where['machine']} in {where['precision']}: its numbers would mix two "
            "machines. To resume anyway pass resume_anywhere=True (--resume-anywhere); "
            "otherwise use another output folder."
        )
    return model.to(device), meta


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file, then rename), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def refuse_existing(path: Path) -> Path:
    """A results file is evidence that a README may cite: a rerun never replaces one. Call it
    before the work, so that a refusal costs nothing."""
    if Path(path).exists():
        raise SystemExit(f"{path} exists; pass --out another path (or delete it on purpose)")
    return Path(path)


def nanmean(x) -> float:
    return float(np.nanmean(np.asarray(x, dtype=float)))
