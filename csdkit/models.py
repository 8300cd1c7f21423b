"""The model: a CIFAR-style ResNet feature extractor and a growing cosine classifier.

ResNet-(6n+2) as in He et al. 2016, section 4.2: three stages of n basic blocks with 16/32/64
channels, parameter-free "option A" shortcuts, global average pooling to a 64-d feature.
ResNet-32 is the paper's; 8 keeps CPU runs short. The classifier has no bias and L2-normalises
its rows at every forward, so a logit is |f| cos(f, w_c): the class direction alone decides, as
in cosine retrieval. It grows with each task, keeping the old rows bit for bit. Or a fixed
simplex classifier (SimplexClassifier), for compatibility."""

from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F
from torch import nn

from csdkit import require
from csdkit.data import channel_stats, normalize


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Option A: a parameter-free shortcut. Subsample by 2 and pad the new channels with zeros.
        self.pad = planes - in_planes if (stride != 1 or in_planes != planes) else 0
        self.stride = stride

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad == 0 and self.stride == 1:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.pad // 2
        return F.pad(x, (0, 0, 0, 0, half, self.pad - half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CosineClassifier(nn.Module):
    """logits[b, c] = features[b] . w_c / |w_c|  (no bias).  features [B, D] -> logits [B, C]."""

    def __init__(self, feature_dim: int, n_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, feature_dim))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default initialisation

    @property
    def n_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ F.normalize(self.weight, dim=1).t()

    @torch.no_grad()
    def grow(self, n_new: int) -> None:
        """Add `n_new` freshly initialised rows, the old ones unchanged. A new Parameter replaces
        the old one, so build the optimizer after growing."""
        require(n_new >= 1, f"grow() needs n_new >= 1, got {n_new}")
        new_rows = torch.empty(n_new, self.weight.shape[1], device=self.weight.device)
        nn.init.kaiming_uniform_(new_rows, a=5**0.5)
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), new_rows.to(self.weight)]))


def simplex_vertices(k: int) -> torch.Tensor:
    """A regular simplex's K unit vertices [K, K-1], centred: W W^T = K/(K-1) I - 1/(K-1) 1 1^T
    (Pernici et al., ICPR 2020). e_1..e_{K-1} and a 1, a = (1 - sqrt(K)) / (K-1) (the point
    sqrt(2) from every e_i), centred and normalised: a closed form, the same on every machine."""
    require(k >= 2, f"a simplex classifier needs at least 2 classes, got {k}")
    d = k - 1
    v = torch.cat([torch.eye(d, dtype=torch.float64),
                   torch.full((1, d), (1 - k**0.5) / d, dtype=torch.float64)])
    return F.normalize(v - v.mean(0), dim=1).float()


class SimplexClassifier(nn.Module):
    """logits = features @ W^T, W the simplex's K vertices (one per class of the dataset, from
    task 1 on) as a buffer: no optimiser or weight decay touches it. [B, K-1] -> [B, K]."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.register_buffer("weight", simplex_vertices(n_classes))
        self.n_classes = n_classes  # fixed: a simplex classifier never grows

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.t()


class ResNet(nn.Module):
    """CIFAR ResNet: images [B, 3, H, W] (normalised) -> (logits [B, C], features [B, 64]).
    simplex=True: a SimplexClassifier for all K = n_classes, after a learnable linear map from
    the 64-d pooled feature to K-1 dimensions, the retrieval feature [B, K-1]."""

    def __init__(self, depth: int = 32, n_classes: int = 10, simplex: bool = False):
        super().__init__()
        require(depth >= 8 and (depth - 2) % 6 == 0,
                f"ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, ...), got {depth}")
        # A linear map of a 64-d feature spans at most 64 of the K-1 dimensions the vertices span
        require(not simplex or n_classes <= 65, f"a simplex classifier for {n_classes} classes "
                f"needs {n_classes - 1}-d features, but the ResNet gives 64: at most 65 classes")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, in_planes = [], 16
        for planes, stride in [(16, 1), (32, 2), (64, 2)]:
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.simplex, self.feature_dim = simplex, n_classes - 1 if simplex else 64
        self.project = nn.Linear(64, n_classes - 1) if simplex else nn.Identity()
        self.classifier = SimplexClassifier(n_classes) if simplex else CosineClassifier(64,
                                                                                        n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def n_classes(self) -> int:
        return self.classifier.n_classes

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.project(self.embed(x))
        return self.classifier(features), features


def resnet(depth: int = 32, n_classes: int = 10, simplex: bool = False) -> ResNet:  # by name
    return ResNet(depth=depth, n_classes=n_classes, simplex=simplex)


@torch.no_grad()
def influence_classifier(teacher: ResNet, train, mean, std) -> CosineClassifier:
    """BCT's old classifier for a new task (Shen et al., CVPR 2020), frozen: the teacher's rows,
    then per new class the teacher's mean feature of its training images (labels follow the
    class order, so new classes come after the old rows)."""
    feats, _ = extract(teacher, train.images, mean, std)
    labels = train.labels.to(feats.device)
    rows = torch.stack([feats[labels == c].mean(0) for c in labels.unique()])
    head = copy.deepcopy(teacher.classifier)
    head.weight = nn.Parameter(torch.cat([head.weight, rows]))
    return head.requires_grad_(False)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def progress_bar(iterable, quiet: bool, **kwargs):
    """tqdm.auto: a widget in Jupyter, a text bar in a terminal, nothing when quiet or on CI."""
    from tqdm.auto import tqdm

    on_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    return tqdm(iterable, disable=quiet or on_ci, leave=False, **kwargs)


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
    batches = [model(normalize(images[i : i + batch_size].to(device), mean, std))
               for i in progress_bar(range(0, len(images), batch_size), quiet, desc="features")]
    model.train(was_training)
    return torch.cat([f.float() for _, f in batches]), torch.cat([z.float() for z, _ in batches])
