import json

import pytest

from fastdit.training import ConfigError, TrainConfig


def test_defaults_validate_and_round_trip_through_json():
    cfg = TrainConfig()
    cfg.validate()
    again = TrainConfig.from_json_string(cfg.to_json())
    assert again == cfg
    assert isinstance(again.optim.betas, tuple) and isinstance(again.data.latent_shape, tuple)


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"run": {"max_steps": 50, "compile": True}, "optim": {"betas": [0.9, 0.95]},
                                "model": {"name": "DiT-S/2", "options": {"depth": 4}}}))
    cfg = TrainConfig.from_json(str(path), ["optim.lr=3e-4", "run.compile=false", "optim.betas=0.8,0.9",
                                            "model.options.depth=12", "model.options.qk_norm=true",
                                            "model.name=DiT-XL/2", "schedule.total_steps=null",
                                            "data.latent_shape=[16, 64, 64]", "run.max_steps=2e3"])
    assert cfg.run.max_steps == 2000 and cfg.run.compile is False
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.name == "DiT-XL/2" and cfg.model.options == {"depth": 12, "qk_norm": True}
    assert cfg.schedule.total_steps is None and cfg.data.latent_shape == (16, 64, 64)


@pytest.mark.parametrize("overrides,message", [
    (["optim.lrr=1"], "unknown config key optim.lrr (did you mean 'lr'?)"),
    (["optimizer.lr=1"], "unknown config section 'optimizer'"),
    (["optim.lr"], "not of the form section.key=value"),
    (["lr=1"], "must be dotted"),
    (["optim.lr=fast"], "optim.lr: cannot use 'fast' as float"),
    (["optim.lr=-1"], "optim.lr must be a positive finite number"),
    (["run.max_steps=1.5"], "run.max_steps: cannot use '1.5' as int"),
    (["run.compile=maybe"], "run.compile: cannot use 'maybe' as bool"),
    (["run.precision=fp16"], "run.precision must be one of bf16, fp32, fp8"),
    (["run.fp8_recipe=fp4"], "run.fp8_recipe must be one of rowwise, rowwise_hp_wgrad, tensorwise"),
    (["optim.betas=0.9"], "optim.betas: expected 2 values"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last must be >= 1"),
    (["schedule.kind=cosine", "schedule.warmup_steps=5000", "run.max_steps=100"], "for a cosine schedule"),
    (["run.max_steps.x=1"], "run.max_steps has no sub-keys"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({}, overrides)
    assert message in str(err.value)


def test_bad_files_and_json_types(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        TrainConfig.from_json(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainConfig.from_json(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="run.max_steps: cannot use '10' as int"):
        TrainConfig.from_dict({"run": {"max_steps": "10"}})  # JSON values are not re-parsed from text
    with pytest.raises(ConfigError, match="run.compile: cannot use 1 as bool"):
        TrainConfig.from_dict({"run": {"compile": 1}})
    with pytest.raises(ConfigError, match="expected an object"):
        TrainConfig.from_dict({"run": 3})
    with pytest.raises(ConfigError, match="unknown config key ema.decya"):
        TrainConfig.from_dict({"ema": {"decya": 0.9}})


def test_diff_lists_changed_keys():
    a, b = TrainConfig(), TrainConfig.from_dict({}, ["optim.lr=1", "run.max_steps=5"])
    assert sorted(a.diff(b)) == ["optim.lr", "run.max_steps"]


def test_changes_name_nested_options_and_the_new_defaults():
    a = TrainConfig.from_dict({"model": {"name": "DiT-S/2", "options": {"depth": 2, "qk_norm": True}}})
    b = TrainConfig.from_dict({"model": {"name": "DiT-B/2", "options": {"depth": 4}}}, ["optim.lr=1e-3"])
    from fastdit.training.config import UNSET, is_model_defining
    assert a.changes(b) == [("model.name", "DiT-S/2", "DiT-B/2"), ("model.options.depth", 2, 4),
                            ("model.options.qk_norm", True, UNSET), ("optim.lr", 1e-4, 1e-3)]
    assert [is_model_defining(k) for k, _, _ in a.changes(b)] == [True, True, True, False]
    assert is_model_defining("data.latent_shape") and not is_model_defining("data.batch_size")
    # run.output_dir has no default (the Trainer requires it); the safetensors export and MFU peak are opt-in
    cfg = TrainConfig()
    assert cfg.run.output_dir == "" and cfg.checkpoint.safetensors is False and cfg.logging.peak_tflops is None
    with pytest.raises(ConfigError, match="run.output_dir is required: pass --output-dir DIR"):
        cfg.require_output_dir()
    assert TrainConfig.from_dict({}, ["logging.peak_tflops=500"]).logging.peak_tflops == 500.0
    with pytest.raises(ConfigError, match="logging.peak_tflops must be > 0"):
        TrainConfig.from_dict({}, ["logging.peak_tflops=0"])


@pytest.mark.parametrize("option", [{"pooled_dim": 16}, {"guidance_embed": True}])
def test_mmdit_inputs_the_trainer_cannot_feed_are_refused_at_build(option):
    from fastdit.training.build import build_model
    cfg = TrainConfig.from_dict({}, ["model.name=MMDiT-Tiny/2", "data.latent_shape=4,8,8",
                                 *[f"model.options.{k}={str(v).lower()}" for k, v in option.items()]])
    with pytest.raises(ConfigError, match=f"model.options.{next(iter(option))}: the trainer cannot feed"):
        build_model(cfg)


@pytest.mark.parametrize("interval,ok", [([0.0, 0.6], True), ([0.2, 0.2], True), ([0.7, 0.3], False),
                                         ([0, 1.5], False), ("0,1", False), ([0.1], False)])
def test_sampling_guidance_interval_is_validated(interval, ok):
    from fastdit.diffusion import RectifiedFlow
    from fastdit.training.build import sampling_options
    cfg = TrainConfig.from_dict({"task": {"options": {"sampling": {"guidance_interval": interval}}}})
    if ok:
        assert sampling_options(cfg, RectifiedFlow())["guidance_interval"] == tuple(float(v) for v in interval)
    else:
        with pytest.raises(ConfigError, match="guidance_interval must be"):
            sampling_options(cfg, RectifiedFlow())
