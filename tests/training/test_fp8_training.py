"""run.precision=fp8: a DiT trains with its block Linear layers as FP8 GEMMs (bf16 autocast around them), the
start event says what was switched, checkpoints keep the stock keys (they load into a bf16 model), and resume
is exact in FP8 mode too."""
from __future__ import annotations

import json
import os

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
