"""DiffusionTask / ReconstructionTask: what the trainer calls."""
import pytest
import torch

from fastdit.diffusion import RectifiedFlow
from fastdit.diffusion.task import DiffusionTask, ReconstructionTask


class Recorder(torch.nn.Module):
    """Records the keyword arguments it is called with; predicts zeros."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, x, t, **cond):
        self.calls.append({k: v.clone() for k, v in cond.items()})
        return x * 0 * self.weight


def test_loss_passes_the_condition_keys_and_equals_the_objective_loss():
    objective = RectifiedFlow(time_sampling="uniform")
    task = DiffusionTask(objective, ("y",))
    model = Recorder()
    batch = {"x": torch.randn(4, 2, 3, 3), "y": torch.arange(4), "unused": torch.zeros(4)}
    torch.manual_seed(1)
    loss = task.loss(model, batch)
    torch.manual_seed(1)
    want = objective.loss(model, batch["x"], {"y": batch["y"]})
    assert torch.equal(loss, want) and loss.dim() == 0
    assert set(model.calls[0]) == {"y"} and torch.equal(model.calls[0]["y"], batch["y"])


def test_caption_dropout_empties_whole_captions_at_the_given_rate():
    task = DiffusionTask(RectifiedFlow(), ("context", "context_mask"), caption_dropout=0.3)
    B, L = 4000, 5
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, 3:] = False
    cond = task.condition({"x": torch.zeros(B, 1), "context": torch.randn(B, L, 8), "context_mask": mask})
    dropped = ~cond["context_mask"].any(1)
    assert abs(dropped.float().mean().item() - 0.3) < 0.03
    assert torch.equal(cond["context_mask"][~dropped], mask[~dropped])  # kept captions untouched
    assert cond["context"][dropped].abs().sum() == 0


def test_flops_and_samples_are_exposed_only_when_given():
    plain = DiffusionTask(RectifiedFlow())
    assert not hasattr(plain, "flops_per_sample") and not hasattr(plain, "samples")
    task = DiffusionTask(RectifiedFlow(), flops_per_sample=123, samples=lambda m, s: torch.zeros(1, 1, 2, 2))
    assert task.flops_per_sample == 123 and task.samples(None, 0).shape == (1, 1, 2, 2)


def test_errors_name_the_problem():
    task = DiffusionTask(RectifiedFlow(), ("y",))
    with pytest.raises(KeyError, match="'y'"):
        task.loss(Recorder(), {"x": torch.randn(2, 1, 2, 2)})
    with pytest.raises(KeyError, match="'x'"):
        task.loss(Recorder(), {"y": torch.zeros(2)})
    with pytest.raises(ValueError, match="caption_dropout"):
        DiffusionTask(RectifiedFlow(), caption_dropout=1.0)
    with pytest.raises(KeyError, match="context"):
        DiffusionTask(RectifiedFlow(), ("y",), caption_dropout=0.1).condition({"y": torch.zeros(2)})


def test_reconstruction_task_is_the_mse_of_the_model_output():
    model = torch.nn.Conv2d(1, 1, 1)
    x = torch.randn(3, 1, 4, 4)
    assert torch.allclose(ReconstructionTask().loss(model, {"x": x}), ((model(x) - x) ** 2).mean())
