import pytest
import torch
from torch import nn

from fastdit.training import EMA


def _model():
    m = nn.Sequential(nn.Linear(7, 13), nn.GELU(), nn.Linear(13, 5))
    m.frozen = nn.Parameter(torch.randn(3), requires_grad=False)
    return m


@pytest.mark.parametrize("warmup", [True, False])
def test_update_matches_a_float64_reference(warmup):
    model = _model()
    ema = EMA(model, decay=0.95, warmup=warmup)
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for n in range(25):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        d = min(0.95, (1 + n) / (10 + n)) if warmup else 0.95
        assert ema.current_decay() == d
        ema.update()
        for name, p in model.named_parameters():
            ref[name] = d * ref[name] + (1 - d) * p.detach().double()
    shadow = ema.state_dict()["shadow"]
    assert set(shadow) == set(ref)
    for name, value in ref.items():
        assert shadow[name].dtype == torch.float32
        torch.testing.assert_close(shadow[name].double(), value, rtol=1e-6, atol=1e-6)
    assert torch.equal(shadow["frozen"], model.frozen)  # a constant stays bitwise constant


def test_warmup_decay_values():
    ema = EMA(_model(), decay=0.999)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update()
    assert decays == pytest.approx([0.1, 2 / 11, 3 / 12])
    ema.num_updates = 100000
    assert ema.current_decay() == 0.999


def test_swap_restores_training_weights_bitwise_even_on_error():
    model = _model().to(torch.bfloat16)
    model[0].float()  # mixed dtypes: fp32 and bf16 parameters
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update()
    before = [p.detach().clone() for p in model.parameters()]
    with ema.swap():
        for p, s in zip(model.parameters(), ema.shadow):
            assert torch.equal(p, s.to(p.dtype))
        assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(p, b) and p.dtype == b.dtype for p, b in zip(model.parameters(), before))
    with pytest.raises(RuntimeError):
        with ema.swap():
            raise RuntimeError("sampling failed")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_wrapped_models_share_clean_names_and_state_round_trips():
    model = _model()
    compiled = torch.compile(model)  # wrapper only; never run, so nothing is compiled
    ema = EMA(compiled, decay=0.9)
    assert ema.names == [n for n, _ in model.named_parameters()]
    ema.update()
    other = EMA(_model(), decay=0.5, warmup=False)
    state = ema.state_dict()
    other.load_state_dict({**state, "shadow": {"module._orig_mod." + k: v for k, v in state["shadow"].items()}})
    assert other.num_updates == 1 and other.decay == 0.9 and other.warmup
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({**state, "shadow": {}})
    bad = dict(state["shadow"], **{"0.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict({**state, "shadow": bad})
