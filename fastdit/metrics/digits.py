"""A feature extractor for scikit-learn's digits (the demo's 8×8 or 16×16 images in [-1, 1]): the
penultimate layer of a small CNN trained on the real *training* digits only. It plays Inception's part
in FID for the digits job: :func:`fastdit.metrics.frechet_distance` and
:func:`fastdit.metrics.precision_recall` are computed on its features.

    extractor = DigitFeatures.fit(train_images, train_labels, seed=0, cache_dir="out")
    feats = extractor.features(images)            # (N, 64) float64
    extractor.accuracy(held_images, held_labels)  # fraction classified correctly

Training is seeded and runs on one CPU thread in a few seconds (a private RNG: the global one is untouched);
the same images, labels and seed give the same weights and features, bitwise (same torch build). With
``cache_dir`` the weights are stored as ``digit_features-v<version>-<key>.pt`` (key: a hash of the training
data, seed and settings) and loaded with ``torch.load(weights_only=True)``; a cache file that cannot be read
or does not fit is retrained (with a warning) and rewritten.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VERSION = 1          # bump when the network or its training changes: old cache files are then ignored
FEATURE_DIM = 64


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """How the extractor is trained (part of the cache key)."""
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_shift: int = 1     # random translation (pixels) of each batch: features robust to small shifts


class DigitNet(nn.Module):
    """conv 16 (stride 2 on 16×16 inputs) → conv 32 (stride 2) → 4×4 → 64 (the features) → 10 classes."""

    def __init__(self, image_size: int = 16, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, stride=2 if image_size > 8 else 1, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        if x.shape[-1] != 4:
            x = F.adaptive_avg_pool2d(x, 4)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _images(images: Any) -> torch.Tensor:
    """(N, 1, S, S) float32 tensor from a tensor / array of (N, 1, S, S) or (N, S, S) images in [-1, 1]."""
    x = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    x = x.to(torch.float32)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3]:
        raise ValueError(f"images must be (N, 1, S, S) or (N, S, S), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("images have non-finite values")
    return x.contiguous()


def _labels(labels: Any, n: int) -> torch.Tensor:
    y = labels.detach().cpu() if isinstance(labels, torch.Tensor) else torch.from_numpy(np.asarray(labels))
    y = y.to(torch.int64).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"{y.shape[0]} labels for {n} images")
    if y.numel() and (y.min() < 0 or y.max() > 9):
        raise ValueError("labels must be digits 0-9")
    return y.contiguous()


def _cache_key(x: torch.Tensor, y: torch.Tensor, seed: int, settings: TrainSettings) -> str:
    h = hashlib.sha256()
    h.update(repr((VERSION, FEATURE_DIM, int(seed), dataclasses.astuple(settings), tuple(x.shape))).encode())
    h.update(x.numpy().tobytes())
    h.update(y.numpy().tobytes())
    return h.hexdigest()[:16]


def _train(x: torch.Tensor, y: torch.Tensor, seed: int, settings: TrainSettings) -> DigitNet:
    """Single-threaded (restored after): the network is tiny, so one thread is fastest, does not fight a
    busy machine's other threads, and makes the weights independent of the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_single_thread(x, y, seed, settings)
    finally:
        torch.set_num_threads(threads)


def _train_single_thread(x: torch.Tensor, y: torch.Tensor, seed: int, settings: TrainSettings) -> DigitNet:
    g = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = DigitNet(x.shape[-1])
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    n, bs = x.shape[0], settings.batch_size
    steps = settings.epochs * ((n + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=steps, pct_start=0.2)
    s = settings.max_shift
    padded = F.pad(x, (s, s, s, s), value=-1.0) if s else x  # background is -1
    size = x.shape[-1]
    net.train()
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=g)
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            if s:
                dy, dx = torch.randint(0, 2 * s + 1, (2,), generator=g).tolist()
                batch = padded[idx, :, dy:dy + size, dx:dx + size]
            else:
                batch = x[idx]
            loss = F.cross_entropy(net(batch), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


class DigitFeatures:
    """The trained extractor: :meth:`features` (penultimate layer), :meth:`predict`, :meth:`accuracy`."""

    feature_dim = FEATURE_DIM

    def __init__(self, net: DigitNet, image_size: int, seed: int, key: str, from_cache: bool = False):
        self.net = net.eval()
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.key = key
        self.from_cache = from_cache

    @classmethod
    def fit(cls, train_images: Any, train_labels: Any, seed: int = 0, cache_dir: Optional[str] = None,
            settings: TrainSettings = TrainSettings()) -> "DigitFeatures":
        """Train on (N, 1, S, S) images in [-1, 1] with digit labels (the real *training* digits only), or
        load the weights from ``cache_dir`` when the same data, seed and settings were trained before."""
        x = _images(train_images)
        y = _labels(train_labels, x.shape[0])
        if x.shape[0] < 10:
            raise ValueError(f"too few training images ({x.shape[0]})")
        key = _cache_key(x, y, seed, settings)
        path = os.path.join(cache_dir, f"digit_features-v{VERSION}-{key}.pt") if cache_dir else None
        if path and os.path.exists(path):
            try:
                net = DigitNet(x.shape[-1])
                net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
                return cls(net, x.shape[-1], seed, key, from_cache=True)
            except Exception as err:  # corrupt or foreign file: retrain, never crash
                first = (str(err).strip().splitlines() or [""])[0][:200]
                warnings.warn(f"digit feature extractor cache {path} is unreadable ({type(err).__name__}: "
                              f"{first}); retraining", RuntimeWarning, stacklevel=2)
        net = _train(x, y, seed, settings)
        if path:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"
            torch.save(net.state_dict(), tmp)
            os.replace(tmp, path)
        return cls(net, x.shape[-1], seed, key)

    @torch.no_grad()
    def _run(self, images: Any, head: bool, batch: int = 1024) -> torch.Tensor:
        x = _images(images)
        if x.shape[-1] != self.image_size:
            raise ValueError(f"the extractor was trained on {self.image_size}x{self.image_size} images, "
                             f"got {x.shape[-1]}x{x.shape[-1]}")
        fn = self.net if head else self.net.features
        outs = [fn(b) for b in x.split(batch)]
        return torch.cat(outs) if outs else torch.zeros(0, 10 if head else self.feature_dim)

    def features(self, images: Any) -> np.ndarray:
        """(N, 64) float64 penultimate-layer features of (N, 1, S, S) images in [-1, 1]."""
        return self._run(images, head=False).double().numpy()

    def predict(self, images: Any) -> np.ndarray:
        """(N,) predicted digits."""
        return self._run(images, head=True).argmax(1).numpy()

    def accuracy(self, images: Any, labels: Any) -> float:
        """Fraction of ``images`` whose predicted digit is ``labels``."""
        y = _labels(labels, _images(images).shape[0]).numpy()
        return float((self.predict(images) == y).mean())
