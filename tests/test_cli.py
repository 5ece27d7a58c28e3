import json

import pytest

from fastdit.cli import main


def test_demo_trains_and_the_loss_goes_down(capsys):
    assert main(["demo", "--steps", "12", "--batch", "8", "--dim", "64", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "step   12/12" in out and "done: 12 steps" in out


def test_info_reports_versions_and_op_paths(capsys):
    assert main(["info", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["default_backend"] == "auto"
    assert info["op_paths (bf16 inputs)"]["adaln_modulate"] == "reference"  # CPU: no kernel under auto
    assert set(info["op_paths (bf16 inputs)"]) == {"adaln_modulate", "gated_residual_adaln", "rms_norm",
                                                   "rope", "qk_norm_rope", "joint_attention"}


@pytest.mark.parametrize("argv,message", [
    (["demo", "--steps", "0"], "--steps must be at least 1"),
    (["demo", "--backend", "fast"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0
    captured = capsys.readouterr()
    assert message in (captured.err + captured.out + str(exc.value.code))
