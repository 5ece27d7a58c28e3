"""What a resume takes from the checkpoint and what from the new config: optimizer hyperparameters and the
LR schedule follow the new config; a different model or data is refused; metrics.jsonl logs each step once."""
import json
import os

import pytest
import torch

from fastdit.training import ConfigError, Trainer, load_state, lr_factor, read_jsonl
from fastdit.training.metrics import truncate_jsonl

STEP = "step_{:09d}".format


def _lrs(run_dir):
    return {r["step"]: r["lr"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "event" not in r}


SCHEDULE = {"kind": "cosine", "warmup_steps": 3, "total_steps": 16, "min_lr_ratio": 0.0}  # toy_config's


def test_resume_applies_the_new_optimizer_hyperparameters_and_schedule(toy, tmp_path, capfd):
    toy.fit(toy.toy_config(tmp_path, **{"run.max_steps": 4, "optim.lr": 1e-3, "optim.weight_decay": 0.01}))
    first = _lrs(tmp_path)
    assert first == {k: 1e-3 * lr_factor(k, **SCHEDULE) for k in range(1, 5)}
    capfd.readouterr()
    new = {"run.max_steps": 8, "optim.lr": 5e-4, "optim.weight_decay": 0.05, "optim.betas": "0.8,0.95",
           "optim.eps": 1e-6, "schedule.min_lr_ratio": 0.1}
    resumed = toy.fit(toy.toy_config(tmp_path, **new))
    assert resumed.resumed_from.endswith(STEP(4))
    groups = resumed.optimizer.param_groups
    assert len(groups) == 2
    decay, other = groups
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in other["params"])
    assert decay["weight_decay"] == 0.05 and other["weight_decay"] == 0.0
    for g in groups:
        assert g["initial_lr"] == 5e-4 and g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6
    # the LR of step k is the new base LR times the new schedule's factor at k (the step count is kept)
    schedule = dict(SCHEDULE, min_lr_ratio=0.1)
    lrs = _lrs(tmp_path)
    assert {k: lrs[k] for k in range(1, 5)} == first
    for k in range(5, 9):
        assert lrs[k] == pytest.approx(5e-4 * lr_factor(k, **schedule), rel=1e-12), k
    assert json.load(open(tmp_path / "config.json"))["optim"]["lr"] == 5e-4
    err = capfd.readouterr().err
    assert "with changed settings" in err and "optim.lr 0.001 -> 0.0005" in err
    assert "optim.weight_decay 0.01 -> 0.05" in err
    assert "applied to the loaded optimizer: optim.lr, optim.betas, optim.eps, optim.weight_decay" in err
    assert "LR schedule rebuilt from the new config at step 4 (schedule.min_lr_ratio)" in err


def test_resume_keeps_the_moment_buffers_and_can_turn_weight_decay_on(toy, tmp_path):
    toy.fit(toy.toy_config(tmp_path, **{"run.max_steps": 4, "optim.weight_decay": 0.0}))
    path = str(tmp_path / "checkpoints" / STEP(4))
    saved = load_state(path)["optimizer"]
    assert len(saved["param_groups"]) == 1  # no decay: one group
    cfg = toy.toy_config(tmp_path, **{"run.max_steps": 8, "optim.weight_decay": 0.1, "optim.lr": 2e-3})
    trainer = Trainer(cfg, toy.toy_model(5), toy.NoisyTask(), toy.toy_dataset(cfg))
    try:
        trainer.load_checkpoint(path)
        groups = trainer.optimizer.param_groups
        assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
        assert [g["lr"] for g in groups] == [2e-3 * lr_factor(5, **SCHEDULE)] * 2
        names = {p: n for n, p in trainer.raw_model.named_parameters()}
        for p, st in trainer.optimizer.state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(st[key], saved["state"][names[p]][key]), (names[p], key)
        assert trainer.scheduler.last_epoch == 4
    finally:
        trainer.close()


@pytest.mark.parametrize("explicit", [False, True])
def test_resume_refuses_a_different_model_or_data(toy, tmp_path, explicit):
    toy.fit(toy.toy_config(tmp_path / "run", **{"run.max_steps": 4}))
    changed = {"model.name": "DiT-S/2", "model.options.depth": 3, "data.num_classes": 7,
               "data.latent_shape": "2,8,8", "task.name": "ddpm", "optim.lr": 1e-4, "run.max_steps": 8}
    out = tmp_path / ("new" if explicit else "run")
    if explicit:
        changed["checkpoint.resume"] = str(tmp_path / "run" / "checkpoints" / STEP(4))
    with pytest.raises(ConfigError) as err:
        toy.fit(toy.toy_config(out, **changed))
    text = str(err.value)
    for item in ("model.name '' -> 'DiT-S/2'", "model.options.depth (unset) -> 3", "data.num_classes 5 -> 7",
                 "data.latent_shape [2, 4, 4] -> [2, 8, 8]", "task.name '' -> 'ddpm'", "new run.output_dir"):
        assert item in text, (item, text)
    assert "optim.lr" not in text and "size mismatch" not in text and STEP(4) in text
    # the old run is untouched and still resumes with its own settings
    assert json.load(open(tmp_path / "run" / "config.json"))["model"]["name"] == ""
    again = toy.fit(toy.toy_config(tmp_path / "run", **{"run.max_steps": 5}))
    assert again.resumed_from.endswith(STEP(4))


def test_metrics_after_a_resume_hold_each_step_once(toy, tmp_path):
    # steps 5 and 6 were logged but never checkpointed (as if killed after step 6): a resume runs them again
    toy.fit(toy.toy_config(tmp_path, **{"run.max_steps": 6, "checkpoint.every": 4, "checkpoint.save_final": False}))
    before = read_jsonl(tmp_path / "metrics.jsonl")
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "loss": 1.')  # a torn last line
    toy.fit(toy.toy_config(tmp_path, **{"run.max_steps": 8, "checkpoint.every": 4}))
    records = read_jsonl(tmp_path / "metrics.jsonl")
    steps = [r["step"] for r in records if "event" not in r]
    assert steps == list(range(1, 9))
    assert records[:len([r for r in before if r["step"] <= 4])] == [r for r in before if r["step"] <= 4]
    events = [(r["event"], r["step"]) for r in records if "event" in r]
    assert events == [("start", 0), ("checkpoint", 4), ("resume", 4), ("checkpoint", 8)]
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_truncate_jsonl_keeps_records_up_to_the_step(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [{"event": "start", "step": 0}, {"note": "no step"}, {"step": 1, "loss": 1.0},
             {"step": 2, "loss": 2.0}, {"event": "checkpoint", "step": 2}, {"step": 3, "loss": 3.0},
             {"note": "after the cut"}, {"event": "checkpoint", "step": 4}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 5, "lo')
    assert truncate_jsonl(str(path), 2) == 4
    assert read_jsonl(path) == lines[:5]
    assert truncate_jsonl(str(path), 2) == 0
