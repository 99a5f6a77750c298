"""A small CNN digit classifier: prompt accuracy and FID features (penultimate layer) for the embedded default."""
from __future__ import annotations

import io
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import UserError

FILE = "classifier.pt"
FEATURE_DIM = 128


class DigitCNN(nn.Module):
    """Three conv blocks (32x32 -> 4x4) and a 128-d penultimate layer; inputs are images in [0, 1]."""

    def __init__(self, feature_dim: int = FEATURE_DIM):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.body = nn.Sequential(block(1, 32), block(32, 64), block(64, 128), nn.Flatten(),
                                  nn.Linear(128 * 4 * 4, feature_dim), nn.ReLU())
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, 10)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.body(images01 * 2 - 1)))


class DigitClassifier:
    """Frozen classifier in eval mode: logits / predict / features on [B, 1, 32, 32] images in [0, 1]."""

    def __init__(self, net: DigitCNN, device):
        self.net = net.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)

    @torch.no_grad()
    def logits(self, images01: torch.Tensor) -> torch.Tensor:
        return self.net(images01.to(self.device, torch.float32))

    @torch.no_grad()
    def predict(self, images01: torch.Tensor) -> torch.Tensor:
        return self.logits(images01).argmax(1)

    @torch.no_grad()
    def features(self, images01: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [B, 128]: the FID feature space for MNIST-sized samples."""
        return self.net.body(images01.to(self.device, torch.float32) * 2 - 1)

    @torch.no_grad()
    def accuracy(self, images01: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
        hits = sum((self.predict(images01[i:i + batch]).cpu() == labels[i:i + batch].cpu()).sum().item()
                   for i in range(0, len(labels), batch))
        return hits / len(labels)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation: random translation by up to 2 px and rotation/scale by a few percent (affine grid)."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(b, generator=gen) * 2 - 1) * 0.1
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * (2 / 16)       # grid units: 16 px = 1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def train_classifier(train: tuple[torch.Tensor, torch.Tensor], held_out: tuple[torch.Tensor, torch.Tensor],
                     epochs: int, seed: int = 0, batch_size: int = 64, lr: float = 2e-3,
                     device="cpu") -> tuple[DigitClassifier, float]:
    """Train on `train` ([-1, 1] digits, labels) with one-cycle Adam; returns (classifier, held-out accuracy)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = (train[0] + 1) / 2, train[1]
    net = DigitCNN().to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(y) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch))
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            idx = order[i:i + batch_size]
            xb = _augment(x[idx], gen).to(device)
            loss = F.cross_entropy(net(xb), y[idx].to(device), label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    clf = DigitClassifier(net, device)
    return clf, clf.accuracy((held_out[0] + 1) / 2, held_out[1])


def save_classifier(clf: DigitClassifier, path: Path) -> None:
    from pipeline.files import atomic_write_bytes

    buf = io.BytesIO()
    torch.save({"state_dict": clf.net.state_dict(), "feature_dim": clf.net.head.in_features}, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_classifier(teacher_dir, device="cpu") -> DigitClassifier:
    """The digit classifier saved by `flowsteer teacher` in the embedded teacher's directory."""
    path = Path(teacher_dir) / FILE
    if not path.is_file():
        raise UserError(f"no digit classifier at {path}: run `flowsteer teacher` first")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        net = DigitCNN(blob["feature_dim"])
        net.load_state_dict(blob["state_dict"])
    except Exception as exc:
        raise UserError(f"{path} is not a readable classifier checkpoint ({type(exc).__name__}); "
                        f"delete it and rerun `flowsteer teacher`") from None
    return DigitClassifier(net, device)
