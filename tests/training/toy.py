"""Tiny models, tasks and a run helper shared by the trainer tests and the multi-process worker."""
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

from fastdit.data import SyntheticLatents, TensorDictDataset
from fastdit.training import TrainConfig


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x, c):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x) * (1 + c))))


class ToyNet(nn.Module):
    """A small residual MLP 'denoiser' with a ``blocks`` ModuleList: (B, C, H, W) latents + labels."""

    def __init__(self, channels=2, size=4, dim=32, depth=2, num_classes=5):
        super().__init__()
        self.inp = nn.Linear(channels * size * size, dim)
        self.embed = nn.Embedding(num_classes, dim)
        self.blocks = nn.ModuleList([Block(dim) for _ in range(depth)])
        self.out = nn.Linear(dim, channels * size * size)
        self.register_buffer("scale", torch.ones(1))
        self.shape = (channels, size, size)

    def forward(self, x, y, t):
        h = self.inp(x.flatten(1)) + t[:, None]
        c = self.embed(y)
        for block in self.blocks:
            h = block(h, c)
        return self.out(h).view(x.shape) * self.scale


class NoisyTask:
    """Rectified-flow-like objective drawing from torch, numpy and python RNGs, so that exact resume
    needs every RNG state restored. ``nan_at`` = {(rank, step)}: return NaN there (for the guard)."""

    tokens_per_sample = 16
    flops_per_sample = 1_000_000

    def __init__(self, rank=0, nan_at=()):
        self.rank, self.nan_at, self.calls = rank, set(nan_at), 0

    def loss(self, model, batch):
        self.calls += 1
        x, y = batch["x"], batch["y"]
        t = torch.rand(x.shape[0], device=x.device)
        noise = torch.randn_like(x)
        jitter = float(np.random.uniform(0.9, 1.1)) * random.uniform(0.95, 1.05)
        xt = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
        loss = ((model(xt, y, t) - (noise - x)) ** 2).mean() * jitter
        if (self.rank, self.calls) in self.nan_at:
            # NaN in the loss of this rank only; the gradients stay finite (a constant has none), so
            # only this rank's own check can see it and the ranks must agree to skip together
            loss = loss + float("nan")
        return loss

    def samples(self, model, step):
        dev = next(model.parameters()).device
        x = torch.randn(6, *model.shape, device=dev)
        return torch.tanh(model(x, torch.arange(6, device=dev) % 5, torch.zeros(6, device=dev)))[:, :1]


def toy_config(out, **overrides):
    cfg = TrainConfig.from_dict({
        "run": {"output_dir": str(out), "max_steps": 12, "precision": "fp32", "device": "cpu", "seed": 7,
                "dist_timeout_s": 60},
        "data": {"batch_size": 4, "latent_shape": [2, 4, 4], "num_classes": 5},
        "optim": {"lr": 3e-3, "weight_decay": 0.01, "grad_clip": 1.0},
        "schedule": {"kind": "cosine", "warmup_steps": 3, "total_steps": 16},
        "ema": {"decay": 0.99},
        "checkpoint": {"every": 4, "keep_last": 2},
        "logging": {"every": 1, "progress_bar": False, "tensorboard": False},
    }, [f"{k}={v}" for k, v in overrides.items()])
    return cfg


def write_latent_shards(directory, cfg, n=35, shard_size=8):
    """Latent shards (``fastdit prepare``'s format) of ``n`` toy latents and labels: shards of ``shard_size``
    and a shorter last one."""
    from fastdit.data.latent_shards import LatentShardWriter

    gen = torch.Generator().manual_seed(4321)
    x = torch.randn(n, *cfg.data.latent_shape, generator=gen)
    y = torch.randint(0, cfg.data.num_classes, (n,), generator=gen)
    writer = LatentShardWriter(str(directory), shard_size, {"toy": True})
    writer.add({"x": x, "y": y}, list(range(n)))
    writer.finish(n)


def every_fifth_bad(source):
    """``source`` with every fifth position of each item replaced by ``Skip("toy bad sample")``: a source
    with bad samples at known places (the trainer must count them)."""
    from fastdit.data.streaming import SampleSource, Skip

    class EveryFifthBad(SampleSource):
        name = "every-fifth-bad"

        def items(self):
            return source.items()

        def read(self, item, start):
            for offset, value in enumerate(source.read(item, start), start):
                yield Skip("toy bad sample") if offset % 5 == 4 else value

    return EveryFifthBad()


def toy_dataset(cfg, rank=0, world_size=1, kind="memory"):
    if kind.startswith(("latents:", "latents-with-bad:")):  # latents[-with-bad]:<dir>:<num_workers>
        from fastdit.data.latent_shards import LatentShards
        from fastdit.data.streaming import StreamingDataset

        name, directory, workers = kind.split(":")
        source = LatentShards(directory, seed=cfg.run.seed)
        if name == "latents-with-bad":
            source = every_fifth_bad(source)
        return StreamingDataset(source, cfg.data.batch_size, seed=cfg.run.seed, rank=rank, world_size=world_size,
                                num_workers=int(workers))
    if kind == "synthetic":
        return SyntheticLatents(cfg.data.latent_shape, cfg.data.batch_size, num_classes=cfg.data.num_classes,
                                seed=cfg.run.seed, rank=rank, world_size=world_size)
    gen = torch.Generator().manual_seed(1234)  # the same "files" on every rank
    data = {"x": torch.randn(37, *cfg.data.latent_shape, generator=gen),
            "y": torch.randint(0, cfg.data.num_classes, (37,), generator=gen)}
    return TensorDictDataset(data, cfg.data.batch_size, seed=cfg.run.seed, rank=rank, world_size=world_size)


def toy_model(seed=0):
    torch.manual_seed(seed)
    return ToyNet()


# ---- launching worker processes like torchrun does ------------------------------------------------
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")


def fit(cfg):
    """A toy model trained as ``cfg`` says (fit, then close); returns the trainer."""
    from fastdit.training import Trainer

    trainer = Trainer(cfg, toy_model(), NoisyTask(), toy_dataset(cfg))
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world_size, args, cwd):
    """Start ``world_size`` worker processes (each in its own session, so a test can SIGKILL them)."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
        if world_size > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(os.path.join(cwd, f"worker{rank}-{port}.log"), "w")
        procs.append(subprocess.Popen([sys.executable, WORKER, *[str(a) for a in args]], cwd=cwd, env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
    return procs


def kill_all(procs):
    for p in procs:
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        p.wait()


def wait_all(procs, timeout):
    """Exit codes of all workers; kills them all and raises if any is still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_all(procs)
            raise AssertionError(f"worker processes still running after {timeout}s (a hang)") from None
    return [p.returncode for p in procs]


def worker_logs(cwd):
    return "\n".join(open(os.path.join(cwd, n)).read()[-3000:] for n in sorted(os.listdir(cwd))
                     if n.startswith("worker") and n.endswith(".log"))


def step_records(run_dir):
    """{step: record} of the metrics log, the last record of each step winning (a resumed run repeats
    the steps after its checkpoint), and the list of repeated (first, last) pairs."""
    from fastdit.training import read_jsonl
    records, repeats = {}, []
    for rec in read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        if "event" in rec:
            continue
        if rec["step"] in records:
            repeats.append((records[rec["step"]], rec))
        records[rec["step"]] = rec
    return records, repeats


def reseal(folder):
    """Rewrite a checkpoint's manifest.json after a test edited its files on purpose (sizes and sha256
    of every other file), so that the edit is not taken for damage."""
    import hashlib
    import json
    folder = str(folder)
    path = os.path.join(folder, "manifest.json")
    with open(path) as fh:
        manifest = json.load(fh)
    files = {}
    for name in sorted(os.listdir(folder)):
        if name != "manifest.json":
            with open(os.path.join(folder, name), "rb") as fh:
                data = fh.read()
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["files"] = files
    with open(path, "w") as fh:
        json.dump(manifest, fh)
