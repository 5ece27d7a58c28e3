"""run.precision=fp8: a DiT trains with its block Linear layers as FP8 GEMMs (bf16 autocast around them), the
start event says what was switched, checkpoints keep the stock keys (they load into a bf16 model), and resume
is exact in FP8 mode too."""
from __future__ import annotations

import json
import os

import pytest
import torch

from fastdit.cli.train import main as main_train
from fastdit.models import create_model
from fastdit.training.checkpoint import load_weights

TINY_DIT = ["model.name=DiT-S/2", "model.options.depth=1", "model.options.hidden_size=32",
            "model.options.num_heads=2", "model.options.num_classes=3"]
QUIET = ["run.device=cpu", "logging.progress_bar=false", "logging.tensorboard=false", "data.batch_size=4",
         "logging.sample_every=0", "data.num_classes=3", "logging.every=1",
         "checkpoint.every=2"]


def _train(out, steps, *extra):
    return main_train(["--output-dir", str(out), "--max-steps", str(steps), "--precision", "fp8", *QUIET,
                       *TINY_DIT, *extra])


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_fp8_run_trains_reports_resumes_exactly_and_checkpoints_stock_keys(tmp_path):
    assert _train(tmp_path / "straight", 4) == 0
    records = _records(tmp_path / "straight")
    start = next(r for r in records if r.get("event") == "start")
    assert start["fp8"] == ("fp8 (rowwise): 4 Linear layers in 1 blocks run as FP8 GEMMs; on the CPU: "
                            "torch._scaled_mm dequantises (the FP8 numerics, not its speed)")
    losses = [r["loss"] for r in records if "event" not in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert _train(tmp_path / "run", 2) == 0 and _train(tmp_path / "run", 4) == 0  # stop at 2, resume to 4
    resumed = [r["loss"] for r in _records(tmp_path / "run") if "event" not in r]
    assert resumed == losses
    state, _ = load_weights(str(tmp_path / "run"), use_ema=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["run"]["precision"] == "fp8" and config["run"]["fp8_recipe"] == "rowwise"
    stock = create_model("DiT-S/2", depth=1, hidden_size=32, num_heads=2, num_classes=3,
                         input_size=config["data"]["latent_shape"][1], in_channels=config["data"]["latent_shape"][0])
    stock.load_state_dict(state, strict=True)


def _launch_cli(world, argv, cwd):
    """``world`` processes of ``python -m fastdit.cli train`` with torchrun's variables (gloo on the CPU)."""
    import socket
    import subprocess
    import sys

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(os.path.join(cwd, f"rank{rank}.log"), "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "fastdit.cli", "train", *argv], cwd=cwd, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_fp8_trains_under_ddp_and_fsdp2_on_two_gloo_ranks(tmp_path, parallel):
    """FP8 mode with the model wrapped (DDP, or FSDP2 per block): both ranks finish, the loss is finite, and
    the checkpoint has the stock keys."""
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), "--max-steps", "3", "--precision", "fp8", *QUIET, *TINY_DIT,
            f"run.distributed={parallel}", "run.dist_timeout_s=60"]
    procs = _launch_cli(2, argv, tmp_path)
    try:
        codes = [p.wait(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text() for r in range(2))
    assert codes == [0, 0], logs
    records = _records(out)
    start = next(r for r in records if r.get("event") == "start")
    assert start["world_size"] == 2 and start["parallel"] == parallel and start["fp8"].startswith("fp8 (rowwise)")
    losses = [r["loss"] for r in records if "event" not in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    state, _ = load_weights(str(out), use_ema=False)
    assert "blocks.0.attn.qkv.weight" in state and "blocks.0.mlp.fc2.weight" in state
