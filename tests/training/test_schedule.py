import math

import pytest
import torch

from fastdit.training import build_scheduler, lr_factor


def test_warmup_then_constant():
    assert [lr_factor(s, warmup_steps=4) for s in range(1, 7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(1) == 1.0


def test_cosine_values():
    kw = dict(kind="cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_factor(10, **kw) == 1.0
    assert lr_factor(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(35, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_factor(110, **kw) == pytest.approx(0.1) and lr_factor(500, **kw) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        lr_factor(0)
    with pytest.raises(ValueError):
        lr_factor(5, kind="cosine", warmup_steps=10, total_steps=10)


def test_scheduler_follows_lr_factor_and_round_trips():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=2.0)
    kw = dict(kind="cosine", warmup_steps=3, total_steps=20, min_lr_ratio=0.0)
    sched = build_scheduler(opt, **kw)
    seen = []
    for step in range(1, 9):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * lr_factor(s, **kw) for s in range(1, 9)])
    opt2 = torch.optim.SGD([p], lr=2.0)
    sched2 = build_scheduler(opt2, **kw)
    sched2.load_state_dict(sched.state_dict())
    opt2.load_state_dict(opt.state_dict())
    sched.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(2.0 * lr_factor(10, **kw))
