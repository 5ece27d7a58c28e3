"""A training process for the multi-process tests (launched by tests with torchrun's environment
variables set: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; none for one process).

    python worker.py OUT_DIR [--steps N] [--every K] [--nan RANK:STEP ...] [--nonfinite skip|error]
                             [--kill-in-save STEP:POINT] [--delay S] [--data memory|synthetic]
                             [--parallel auto|ddp|fsdp] [--same-stream]

--kill-in-save makes rank 0 SIGKILL itself while saving checkpoint STEP, at POINT = rename (files
written and fsync'ed, folder not yet renamed) or pointer (folder renamed, `latest` not yet moved).
--same-stream gives every rank rank 0's data and RNG streams, so a DDP run computes one process's steps.
"""
import argparse
import hashlib
import os
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import toy  # noqa: E402

from fastdit.training import Trainer, checkpoint  # noqa: E402
from fastdit.training.checkpoint import step_dirname  # noqa: E402
from fastdit.training.utils import local_tensor  # noqa: E402


class SameStream:
    """A one-rank dataset that reports this process's rank and world size (the trainer checks them)."""

    def __init__(self, inner, rank, world_size):
        self.inner, self.rank, self.world_size = inner, rank, world_size

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __iter__(self):
        return iter(self.inner)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--nan", action="append", default=[])
    p.add_argument("--nonfinite", default="skip")
    p.add_argument("--kill-in-save", default=None)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--data", default="memory")
    p.add_argument("--parallel", default="auto")
    p.add_argument("--same-stream", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    if args.kill_in_save and rank == 0:
        step, point = args.kill_in_save.split(":")
        target = step_dirname(int(step))
        if point == "rename":
            real = checkpoint._rename

            def rename(src, dst):
                if os.path.basename(dst) == target:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(src, dst)
            checkpoint._rename = rename
        else:
            real_point = checkpoint.CheckpointManager._point_latest

            def point_latest(self, name):
                if name == target:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_point(self, name)
            checkpoint.CheckpointManager._point_latest = point_latest

    cfg = toy.toy_config(args.out, **{"run.max_steps": args.steps, "checkpoint.every": args.every,
                                      "checkpoint.keep_last": 3, "run.nonfinite": args.nonfinite,
                                      "run.distributed": args.parallel})
    nan_at = [tuple(int(v) for v in item.split(":")) for item in args.nan]
    task = toy.NoisyTask(rank=rank, nan_at=nan_at)
    if args.delay:
        inner = task.loss

        def slow_loss(model, batch):
            time.sleep(args.delay)  # gives the test time to kill mid-run; draws no random numbers
            return inner(model, batch)
        task.loss = slow_loss
    if args.same_stream:
        import fastdit.training.trainer as trainer_module
        seed_everything = trainer_module.seed_everything  # the trainer seeds rank r with seed + r
        trainer_module.seed_everything = lambda seed: seed_everything(seed - rank)
        dataset = SameStream(toy.toy_dataset(cfg, 0, 1, kind=args.data), rank, world)
    else:
        dataset = toy.toy_dataset(cfg, rank, world, kind=args.data)
    trainer = Trainer(cfg, toy.toy_model(), task, dataset)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    digest = hashlib.sha256()
    for t in list(trainer.raw_model.parameters()) + (trainer.ema.shadow if trainer.ema else []):
        digest.update(local_tensor(t.detach()).cpu().numpy().tobytes())
    print(f"rank {rank} done: {result} weights {digest.hexdigest()}", flush=True)
    # Leave without interpreter finalisation: there gloo's worker threads can still hold tensors and abort the
    # process ("terminate called without an active exception", a known PyTorch teardown race; seen once in
    # ~20 runs of the resume test after a clean finish). This worker's job ends with the line above.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
