"""The trainer in one process: exact in-process resume, checkpoint contents, the non-finite guard,
gradient checkpointing, samples and metrics (multi-process runs: test_resume_multiprocess.py)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from fastdit.training import (NonFiniteError, Trainer, enable_gradient_checkpointing, load_state, make_grid,
                              read_jsonl)
from fastdit.training.checkpoint import STATE_FILE


def _fit(toy, cfg, task=None, model=None, data="memory"):
    trainer = Trainer(cfg, model or toy.toy_model(), task or toy.NoisyTask(), toy.toy_dataset(cfg, kind=data))
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def _losses(run_dir):
    records = {}
    for rec in read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        if "event" not in rec:
            records[rec["step"]] = rec["loss"]
    return [records[s] for s in sorted(records)]


@pytest.mark.parametrize("data", ["memory", "synthetic"])
def test_stop_and_resume_in_process_is_bitwise_exact(toy, tmp_path, data):
    """Prefetching (the default) or not, interrupted or not: the same losses, bit for bit."""
    _fit(toy, toy.toy_config(tmp_path / "a", **{"run.max_steps": 10, "data.prefetch": 0}), data=data)
    _fit(toy, toy.toy_config(tmp_path / "b", **{"run.max_steps": 6, "checkpoint.every": 3}), data=data)
    torch.manual_seed(999)  # whatever happens in between must not matter
    resumed = _fit(toy, toy.toy_config(tmp_path / "b", **{"run.max_steps": 10, "data.prefetch": 5}), data=data)
    assert resumed.resumed_from.endswith("step_000000006")
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    # the prefetch thread drew ahead; the dataset was put back after the last batch trained on
    assert resumed.dataset.state_dict() == load_state(str(tmp_path / "b" / "checkpoints" / "step_000000010"))["data"][0]
    a = load_state(str(tmp_path / "a" / "checkpoints" / "step_000000010"))
    b = load_state(str(tmp_path / "b" / "checkpoints" / "step_000000010"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_checkpoint_contents_are_clean_plain_and_exported(toy, tmp_path):
    cfg = toy.toy_config(tmp_path, **{"run.max_steps": 4, "checkpoint.every": 4, "checkpoint.safetensors": True})
    trainer = _fit(toy, cfg)
    path = trainer.checkpoints.latest()
    state = torch.load(os.path.join(path, STATE_FILE), weights_only=True)  # plain containers only
    assert state["step"] == 4 and state["world_size"] == 1 and len(state["rng"]) == len(state["data"]) == 1
    keys = list(state["model"]) + list(state["ema"]["shadow"]) + list(state["optimizer"]["state"])
    assert not [k for k in keys if "_orig_mod" in k or k.startswith("module.")]
    assert set(state["model"]) == set(trainer.raw_model.state_dict())
    assert json.loads(state["config"]) == cfg.to_dict()
    assert json.loads(open(os.path.join(path, "config.json")).read()) == cfg.to_dict()
    model = load_file(os.path.join(path, "model.safetensors"))
    ema = load_file(os.path.join(path, "ema.safetensors"))
    for k, v in trainer.raw_model.state_dict().items():
        assert torch.equal(model[k], v)
    for k, v in state["ema"]["shadow"].items():
        assert torch.equal(ema[k], v)
    assert torch.equal(ema["scale"], model["scale"])  # buffers come from the model
    assert not torch.equal(ema["out.weight"], model["out.weight"])


def test_a_checkpoint_with_wrapper_prefixes_loads(toy, tmp_path):
    """Checkpoints written from DDP/compiled modules elsewhere carry module./_orig_mod. prefixes."""
    trainer = _fit(toy, toy.toy_config(tmp_path / "a", **{"run.max_steps": 4, "checkpoint.every": 4}))
    state = load_state(trainer.checkpoints.latest())
    state["model"] = {"module._orig_mod." + k: v for k, v in state["model"].items()}
    os.makedirs(tmp_path / "x")
    torch.save(state, tmp_path / "x" / STATE_FILE)
    other = Trainer(toy.toy_config(tmp_path / "b", **{"checkpoint.resume": str(tmp_path / "x")}), toy.toy_model(1),
                    toy.NoisyTask(), toy.toy_dataset(toy.toy_config(tmp_path / "b")))
    try:
        other.load_checkpoint(str(tmp_path / "x"))
        for k, v in trainer.raw_model.state_dict().items():
            assert torch.equal(other.raw_model.state_dict()[k], v)
        assert other.step == 4
    finally:
        other.close()


def test_resume_errors(toy, tmp_path):
    _fit(toy, toy.toy_config(tmp_path, **{"run.max_steps": 4}))
    with pytest.raises(RuntimeError, match="checkpoint.resume=none but"):
        _fit(toy, toy.toy_config(tmp_path, **{"checkpoint.resume": "none"}))
    with pytest.raises(FileNotFoundError, match="no complete fastdit checkpoint"):
        _fit(toy, toy.toy_config(tmp_path / "c", **{"checkpoint.resume": str(tmp_path / "nothing")}))
    state = load_state(str(tmp_path / "checkpoints" / "step_000000004"))
    state["world_size"] = 2
    torch.save(state, tmp_path / "checkpoints" / "step_000000004" / STATE_FILE)
    toy.reseal(tmp_path / "checkpoints" / "step_000000004")
    with pytest.raises(RuntimeError, match="same world size"):
        _fit(toy, toy.toy_config(tmp_path, **{"run.max_steps": 6}))
    cfg = toy.toy_config(tmp_path / "d")
    with pytest.raises(ValueError, match="dataset.rank is 1"):
        Trainer(cfg, toy.toy_model(), toy.NoisyTask(), toy.toy_dataset(cfg, rank=1, world_size=2))


def test_nonfinite_step_is_skipped_and_changes_nothing(toy, tmp_path):
    cfg = toy.toy_config(tmp_path, **{"run.max_steps": 3, "checkpoint.every": 1, "checkpoint.keep_last": 5})
    trainer = _fit(toy, cfg, task=toy.NoisyTask(nan_at=[(0, 2)]))
    s1, s2 = (load_state(str(tmp_path / "checkpoints" / f"step_00000000{i}")) for i in (1, 2))
    assert all(torch.equal(s1["model"][k], s2["model"][k]) for k in s1["model"])
    assert all(torch.equal(s1["ema"]["shadow"][k], s2["ema"]["shadow"][k]) for k in s1["ema"]["shadow"])
    for fqn, st in s1["optimizer"]["state"].items():
        assert all(torch.equal(v, s2["optimizer"]["state"][fqn][k]) for k, v in st.items())
    assert trainer.skipped_steps == 1 and s2["skipped_steps"] == 1
    assert s2["ema"]["num_updates"] == 1
    assert _losses(tmp_path)[1] is None and _losses(tmp_path)[2] is not None


def test_nonfinite_error_policy_and_consecutive_limit(toy, tmp_path):
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite .* rank\(s\) \[0\] \(run.nonfinite=error\)"):
        _fit(toy, toy.toy_config(tmp_path / "a", **{"run.nonfinite": "error"}), task=toy.NoisyTask(nan_at=[(0, 2)]))
    with pytest.raises(NonFiniteError, match="max_consecutive_skips=2"):
        _fit(toy, toy.toy_config(tmp_path / "b", **{"run.max_consecutive_skips": 2}),
             task=toy.NoisyTask(nan_at=[(0, 2), (0, 3), (0, 4)]))


def test_nonfinite_gradient_with_finite_loss_is_caught(toy, tmp_path):
    class GradNaN(toy.NoisyTask):
        def loss(self, model, batch):
            out = super().loss(model, batch)
            if self.calls == 2:  # finite value, NaN gradient
                out = out + 0 * torch.sqrt(-model.out.bias.sum().abs() - 1)
            return out
    trainer = _fit(toy, toy.toy_config(tmp_path, **{"run.max_steps": 3}), task=GradNaN())
    assert trainer.skipped_steps == 1


def test_gradient_checkpointing_gives_the_same_gradients(toy):
    torch.manual_seed(0)
    x, y, t = torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 2]), torch.rand(3)
    grads = []
    for checkpointed in (False, True):
        model = toy.toy_model(0)
        if checkpointed:
            assert enable_gradient_checkpointing(model) == "blocks"
            assert enable_gradient_checkpointing(model) == "blocks"  # idempotent
        model(x, y, t).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert [n for n, _ in model.named_parameters()] == list(grads[0])  # names unchanged
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])

    class WithFlag(torch.nn.Module):
        gradient_checkpointing = False
    m = WithFlag()
    assert enable_gradient_checkpointing(m) == "model" and m.gradient_checkpointing is True


def test_gradient_checkpointing_run_matches_plain_run(toy, tmp_path):
    _fit(toy, toy.toy_config(tmp_path / "a", **{"run.max_steps": 4}))
    _fit(toy, toy.toy_config(tmp_path / "b", **{"run.max_steps": 4, "run.gradient_checkpointing": True}))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_samples_metrics_and_untouched_training_rng(toy, tmp_path):
    _fit(toy, toy.toy_config(tmp_path / "a", **{"run.max_steps": 6}))
    _fit(toy, toy.toy_config(tmp_path / "b", **{"run.max_steps": 6, "logging.sample_every": 3,
                                                "logging.sample_rows": 2, "logging.every": 3}))
    assert sorted(os.listdir(tmp_path / "b" / "samples")) == ["step_000000003.png", "step_000000006.png"]
    from PIL import Image
    img = Image.open(tmp_path / "b" / "samples" / "step_000000006.png")
    assert img.size == (3 * 6 + 2, 2 * 6 + 2) and img.mode == "L"  # 6 images of 4x4 in 2 rows, padding 2
    records = [r for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "event" not in r]
    assert [r["step"] for r in records] == [3, 6]
    a = _losses(tmp_path / "a")
    assert records[1]["loss"] == pytest.approx(sum(a[3:6]) / 3, rel=1e-12)  # sampling drew no training RNG
    rec = records[0]
    assert rec["images_per_s"] > 0 and rec["tokens_per_s"] == pytest.approx(16 * rec["images_per_s"])
    assert rec["tflops"] == pytest.approx(rec["images_per_s"] * 1e6 / 1e12)
    assert "mfu" not in rec  # CPU: no known peak, no MFU (see test_mfu_needs_a_known_or_given_peak)
    assert rec["skipped_steps"] == 0 and rec["lr"] > 0 and rec["grad_norm"] > 0


def test_make_grid_layout_and_range():
    images = torch.stack([torch.full((3, 2, 2), v) for v in (-1.0, 0.0, 1.0, 5.0, -3.0)])
    grid = make_grid(images, rows=2, padding=1)
    assert grid.shape == (2 * 3 + 1, 3 * 3 + 1, 3) and grid.dtype == torch.uint8
    assert grid[1, 1].tolist() == [0, 0, 0] and grid[1, 4].tolist() == [128, 128, 128]
    assert grid[1, 7].tolist() == [255, 255, 255] and grid[4, 1].tolist() == [255, 255, 255]  # clipped
    assert grid[4, 4].tolist() == [0, 0, 0] and int(grid[4, 7].sum()) == 0  # last cell empty
    with pytest.raises(ValueError):
        make_grid(torch.zeros(2, 4, 3, 3), rows=1)


def test_task_must_return_a_scalar(toy, tmp_path):
    class Bad:
        def loss(self, model, batch):
            return torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError, match="scalar"):
        _fit(toy, toy.toy_config(tmp_path), task=Bad())
    with pytest.raises(TypeError, match="loss"):
        Trainer(toy.toy_config(tmp_path), toy.toy_model(), object(), toy.toy_dataset(toy.toy_config(tmp_path)))


@pytest.mark.slow
def test_compile_per_block_trains_and_checkpoints_interchange(toy, tmp_path):
    compiled = _fit(toy, toy.toy_config(tmp_path, **{"run.max_steps": 4, "run.compile": True,
                                                     "run.gradient_checkpointing": True}))
    assert all(b._compiled_call_impl is not None for b in compiled.raw_model.blocks)
    state = load_state(compiled.checkpoints.latest())
    assert not [k for k in state["model"] if "_orig_mod" in k]
    plain = _fit(toy, toy.toy_config(tmp_path, **{"run.max_steps": 6}))  # resumes the compiled run's checkpoint
    assert plain.resumed_from.endswith("step_000000004") and plain.step == 6
    losses = _losses(tmp_path)
    assert len(losses) == 6 and all(v is not None for v in losses)


@pytest.mark.parametrize("split", [True, False])
def test_compile_under_ddp_sets_dynamos_graph_splitting(toy, tmp_path, split):
    """run.compile_ddp_split decides whether dynamo splits compiled blocks at DDP bucket boundaries."""
    import torch.distributed as dist
    # dynamo's own patch restores the setting afterwards (pytest's monkeypatch deletes attributes that a
    # config module serves through __getattr__)
    with torch._dynamo.config.patch(optimize_ddp=not split):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        try:
            cfg = toy.toy_config(tmp_path / "run", **{"run.compile": True, "run.distributed": "ddp",
                                                      "run.compile_ddp_split": split})
            trainer = Trainer(cfg, toy.toy_model(), toy.NoisyTask(), toy.toy_dataset(cfg))
            assert isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
            assert torch._dynamo.config.optimize_ddp is split
        finally:
            dist.destroy_process_group()
    assert torch._dynamo.config.optimize_ddp is True  # torch's default, back


def test_measured_attention_paths_are_checkpointed_and_restored(toy, tmp_path, monkeypatch):
    """backend="auto" times attention paths per process: the trainer stores rank 0's choices in each
    checkpoint and a resumed run adopts them, so it runs the same kernels as the run it continues."""
    import fastdit.ops.attention as attention_ops

    monkeypatch.setattr(attention_ops, "_path_cache", {})
    choice = {"2,16,0,2,64,bfloat16,1": "prepass"}
    attention_ops.set_attention_path_choices(choice)
    _fit(toy, toy.toy_config(tmp_path, **{"run.max_steps": 4, "checkpoint.every": 4}))
    assert load_state(str(tmp_path / "checkpoints" / "step_000000004"))["attention_paths"] == choice
    attention_ops._path_cache.clear()  # a new process
    _fit(toy, toy.toy_config(tmp_path, **{"run.max_steps": 6}))
    assert attention_ops.attention_path_choices() == choice
    with pytest.raises(ValueError, match="not an attention path choice"):
        attention_ops.set_attention_path_choices({"2,16,0,2,64,bfloat16,1": "fast"})


def test_the_dispatch_warm_up_changes_nothing_in_the_run(toy, tmp_path, monkeypatch):
    """Before compiled training on a GPU, one eager no-grad forward lets "auto" measure its choices; it
    draws from the RNGs (noise, t, label dropout) and must restore them: same losses, bit for bit."""
    _fit(toy, toy.toy_config(tmp_path / "plain", **{"run.max_steps": 5}))
    calls = []
    real = Trainer._warm_up_dispatch
    monkeypatch.setattr(Trainer, "_needs_dispatch_warmup", lambda self: True)
    monkeypatch.setattr(Trainer, "_warm_up_dispatch", lambda self, batch: calls.append(1) or real(self, batch))
    _fit(toy, toy.toy_config(tmp_path / "warm", **{"run.max_steps": 5}))
    assert calls == [1]
    assert _losses(tmp_path / "warm") == _losses(tmp_path / "plain")
