"""Training: one config, one function per task, one function for a whole class-incremental run.

The objective for task t (Barletti et al. 2021; see csdkit.losses for each term):

    finetune      L = CE + Triplet                       (the lower bound)
    lwf           L = CE + Triplet + KD                   (Learning without Forgetting)
    fd            L = CE + Triplet + KD + FD              (+ L2 feature distillation)
    csd           L = CE + Triplet + KD + CSD             (paper form of the CSD loss)
    csd_official  L = CE + Triplet + KD + CSD(official)   (the authors' SupCon-over-two-views form)
    joint         L = CE + Triplet on all classes at once (the upper bound)

The distillation terms need a teacher: the model as it was at the end of the previous task,
frozen: a copy in eval mode (BatchNorm uses its running statistics and never updates them) run
under no_grad. The authors' code left its teacher in train mode; we do not copy that.

No checkpoint is ever chosen by a test score: each task keeps its last epoch. Test metrics are
computed after each task for the report only.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from csdkit import losses, metrics
from csdkit.data import Dataset, ImageSet, TaskSplit, augment, load_dataset, make_split, normalize
from csdkit.models import ResNet, resnet

METHODS = {
    "finetune": ("ce", "triplet"),
    "lwf": ("ce", "triplet", "kd"),
    "fd": ("ce", "triplet", "kd", "fd"),
    "csd": ("ce", "triplet", "kd", "csd"),
    "csd_official": ("ce", "triplet", "kd", "csd"),
    "joint": ("ce", "triplet"),
}


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


# The `quick` protocol's per-dataset choices (benchmarks/tune_quick.py, validation R@1 only).
QUICK_TUNED: dict[str, dict] = {
    "digits": {"lr_later": 3e-4, "epochs": 20},
    "glyphs": {"lr_later": 1e-3, "epochs": 16},
}

PRESETS: dict[str, Config] = {
    # Seconds per task on a 2-core CPU: digits at 16x16, ResNet-8, 5 tasks of 2 classes. The
    # first task learns at 1e-3; later tasks learn gently from the previous model (the spirit of
    # the authors' 1e-3 then 1e-5), at the rate and epochs chosen on validation data by
    # benchmarks/tune_quick.py (results in benchmarks/results/tune_<dataset>.json).
    "quick": Config(**QUICK_TUNED["digits"]),
    # The authors' CIFAR-100 protocol (csd-method.md): ResNet-32, 800 epochs a task, batch 128,
    # Adam 1e-3 then 1e-5, weight decay 5e-4, MultiStepLR 200/400/600, crop(4)+flip. We train on
    # all 50k training images (val_fraction 0) as they did, and never select on test.
    "paper": Config(
        dataset="cifar100", n_tasks=2, depth=32, epochs=800, batch_size=128, lr_first=1e-3,
        lr_later=1e-5, weight_decay=5e-4, milestones=(200, 400, 600), gamma=0.1, crop_pad=4,
        flip=True, val_fraction=0.0, image_size=32,
    ),
}


def preset(name: str, dataset: str | None = None) -> Config:
    """A preset's config, for `dataset` if given (quick: with that dataset's tuned values)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    if dataset is None:
        return cfg
    cfg = cfg.replace(dataset=dataset)
    if name == "quick":
        cfg = cfg.replace(**QUICK_TUNED.get(dataset, {}))
    return cfg


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but CUDA is not available here; "
                           "use --device cpu (or auto)")
    return torch.device(device)


def speed_options(cfg: Config, device: torch.device) -> tuple[bool, bool, str | None]:
    """(bf16 autocast, channels_last, torch.compile mode or None) as they apply on `device`.

    True means "on CUDA only", so the defaults leave a CPU run plain fp32 (bf16 changes the
    numbers, and its speed on a CPU depends on the CPU having bf16 instructions); "always" turns
    bf16 / channels_last on for any device; compile only ever acts on CUDA (on a CPU, inductor's
    C++ compile time would outweigh any gain).
    """
    cuda = device.type == "cuda"
    for name in ("bf16", "channels_last"):
        if getattr(cfg, name) not in (True, False, "always"):
            raise ValueError(f"{name} must be True (CUDA only), 'always' or False, "
                             f"got {getattr(cfg, name)!r}")

    def on(value: bool | str) -> bool:
        return value == "always" or (value is True and cuda)

    mode = None
    if cfg.compile and cuda:
        mode = "max-autotune-no-cudagraphs" if cfg.compile is True else str(cfg.compile)
    return on(cfg.bf16), on(cfg.channels_last), mode


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
        variant = "official" if method == "csd_official" else "paper"
        terms["csd"] = losses.csd_loss(
            features, teacher_features, labels, temperature=cfg.csd_temperature, variant=variant
        )
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
    for _ in progress_bar(range(epochs), quiet, desc=desc or "epochs"):
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
    if not isinstance(ckpt, dict) or "model" not in ckpt or "depth" not in ckpt:
        raise ValueError(f"{path} is not a csdkit checkpoint (no 'model'/'depth' entries)")
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
    config: dict
    class_order: list[int]
    increments: list[int]
    recall: list[list[float]]  # R[t][j]: R@1 on task j's test classes after task t (NaN: unseen)
    seen_recall: list[float]  # R@1 over all seen classes' test images after each task
    seen_map: list[float]  # mAP over all seen classes' test images after each task
    accuracy: list[float]  # classification accuracy over seen classes after each task
    old_accuracy: list[float]  # accuracy on the previous tasks' classes (NaN after task 1)
    val_recall: list[float]  # R@1 over seen classes on the validation split (NaN: no val)
    seconds: list[float] = field(default_factory=list)  # training time per task

    @property
    def final_recall(self) -> float:
        return self.seen_recall[-1]

    @property
    def first_task_recall(self) -> float:
        return self.recall[-1][0]

    def to_json(self) -> dict:
        return asdict(self)


def _config_key(cfg: Config) -> dict:
    """The parts of a config that decide what a checkpoint holds (not device or speed knobs)."""
    d = asdict(cfg)
    for k in ("device", "bf16", "channels_last", "compile", "data_root", "data_path"):
        d.pop(k)
    d["milestones"] = list(d["milestones"])
    return json.loads(json.dumps(d))


@torch.no_grad()
def evaluate(model: ResNet, data: Dataset, split: TaskSplit, task: int) -> dict:
    """Test metrics after training `task` (tasks 0..task seen)."""
    seen = split.seen(task)
    test = data.test.of_classes(range(seen))
    feats, logits = extract(model, test.images, data.mean, data.std)
    labels = test.labels.to(feats.device)
    task_of = split.task_of_label()
    row = []
    for j in range(split.n_tasks):
        if j > task:
            row.append(float("nan"))
            continue
        mask = torch.as_tensor(task_of[labels.cpu().numpy()] == j, device=feats.device)
        row.append(metrics.recall_at_k(feats[mask], labels[mask], k=1))
    preds = logits[:, :seen].argmax(1)
    old = labels < split.offsets[task]
    out = {
        "row": row,
        "seen_recall": metrics.recall_at_k(feats, labels, k=1),
        "seen_map": metrics.mean_average_precision(feats, labels),
        "accuracy": (preds == labels).float().mean().item(),
        "old_accuracy": (preds[old] == labels[old]).float().mean().item() if old.any() else
        float("nan"),
    }
    val = data.val.of_classes(range(seen))
    if len(val) > 1:
        vf, _ = extract(model, val.images, data.mean, data.std)
        out["val_recall"] = metrics.recall_at_k(vf, val.labels.to(vf.device), k=1)
    else:
        out["val_recall"] = float("nan")
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
) -> RunResult:
    """Train `method` task after task and evaluate after each task.

    With `out_dir`, a checkpoint `task{t}.pt` is written after each task (weights, config,
    class order, metrics so far) and a rerun resumes after the last finished task; a folder
    holding checkpoints of a different config is refused, never overwritten.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    device = resolve_device(cfg.device)
    data, split = data if data is not None else prepare(cfg)
    key = _config_key(cfg)
    out = Path(out_dir) if out_dir is not None else None

    # joint: one "task" holding every class (the upper bound), evaluated on every task's classes.
    steps = [list(range(data.n_classes))] if method == "joint" else [
        split.classes(t) for t in range(split.n_tasks)]
    result = RunResult(method, key, split.class_order, split.increments, [], [], [], [], [], [])
    torch.manual_seed(cfg.seed)
    model = resnet(cfg.depth, len(steps[0])).to(device)
    teacher = None
    for step, classes in enumerate(progress_bar(steps, quiet, desc=f"{method}: tasks")):
        task = split.n_tasks - 1 if method == "joint" else step  # tasks seen after this step
        ckpt_path = out / f"task{step}.pt" if out is not None else None
        if ckpt_path is not None and ckpt_path.exists():
            model, meta = _resume(ckpt_path, key, method, device)
            _append(result, meta["metrics"], meta["seconds"])
            continue
        if step > 0:
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
        seconds = time.perf_counter() - start
        m = evaluate(model, data, split, task)
        _append(result, m, seconds)
        if ckpt_path is not None:
            save_checkpoint(ckpt_path, model, {
                "depth": cfg.depth, "n_classes": model.n_classes, "method": method,
                "task": step, "config": json.dumps(key), "class_order": split.class_order,
                "metrics": json.dumps(m), "seconds": seconds,
            })
    if out is not None:
        write_json(out / "result.json", result.to_json())
    return result


def _append(result: RunResult, m: dict, seconds: float) -> None:
    result.recall.append(m["row"])
    result.seen_recall.append(m["seen_recall"])
    result.seen_map.append(m["seen_map"])
    result.accuracy.append(m["accuracy"])
    result.old_accuracy.append(m["old_accuracy"])
    result.val_recall.append(m["val_recall"])
    result.seconds.append(seconds)


def _resume(path: Path, key: dict, method: str, device: torch.device) -> tuple[ResNet, dict]:
    model, meta = load_checkpoint(path)
    saved = json.loads(meta["config"])
    if saved != key or meta["method"] != method:
        diff = sorted(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
        if meta["method"] != method:
            diff.append(f"method ({meta['method']} vs {method})")
        raise ValueError(
            f"{path.parent} holds checkpoints of another run (differs in: {', '.join(diff)}). "
            "Nothing was overwritten: choose another output folder, or delete that one to "
            "start afresh."
        )
    meta["metrics"] = json.loads(meta["metrics"])
    return model.to(device), meta


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file, then rename), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def nanmean(x) -> float:
    return float(np.nanmean(np.asarray(x, dtype=float)))
