"""FP8 mode for DiT and MMDiT blocks (issue 16): the blocks' Linear layers -- ``attn.qkv``, ``attn.proj``,
``mlp.fc1``, ``mlp.fc2`` and their caption-stream twins ``attn.txt_qkv``, ``attn.txt_proj``, ``txt_mlp.fc1``,
``txt_mlp.fc2`` -- run as FP8 GEMMs (:func:`fastdit.ops.fp8_linear`), and the LayerNorm-modulate kernels in
front of qkv and fc1 emit their output already quantised per row (:mod:`fastdit.ops.adaln_fp8`), so those two
GEMM inputs cost no quantisation pass of their own. The AdaLN modulation linear, the embedders and the final
layer stay as they are; so do master weights, optimizer state and the residual stream.

    enable_fp8(model, recipe="rowwise")   # in place; returns a report of what was switched
    disable_fp8(model)                     # back to nn.Linear, bit for bit the stock forward again

The switch is a class swap (``nn.Linear`` <-> :class:`Fp8Linear`, a subclass): parameters, their identity
(optimizers and EMA keep working) and state-dict keys are unchanged, so checkpoints load either way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from fastdit.backend import resolve_backend
from fastdit.ops.fp8_linear import (CUDA_MIN_CAPABILITY, Fp8Recipe, _alignment_reason, fp8_linear,
                                    quantize_rows, resolve_recipe)

# Linear layers switched inside each block kind, by their name in the block
_BLOCK_LINEARS = {
    "DiTBlock": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
    "JointDiTBlock": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2",
                      "attn.txt_qkv", "attn.txt_proj", "txt_mlp.fc1", "txt_mlp.fc2"),
}


class Fp8Linear(nn.Linear):
    """``nn.Linear`` whose forward is an FP8 GEMM (:func:`fastdit.ops.fp8_linear`), with the same parameters
    and keys. ``forward(x, x_fp8=None)``: ``x_fp8`` is x already quantised per row, ``(data, scale)``, by the
    op in front (e.g. the LayerNorm-modulate kernel). ``recipe``/``backend`` are attributes (set by
    :func:`enable_fp8`)."""

    recipe: Union[str, Fp8Recipe] = "rowwise"
    backend: Optional[str] = None
    takes_fp8_input = True  # the blocks pass their norms' FP8 rows to layers that say so

    def forward(self, x: Tensor, x_fp8: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        w_fp8 = None
        if not (torch.is_grad_enabled() and self.weight.requires_grad) and not torch.compiler.is_compiling() \
                and resolve_recipe(self.recipe).rowwise:
            w_fp8 = self.quantized_weight()
        return fp8_linear(x, self.weight, self.bias, recipe=self.recipe, x_fp8=x_fp8, backend=self.backend,
                          w_fp8=w_fp8)

    def quantized_weight(self) -> Tuple[Tensor, Tensor]:
        """``quantize_rows(weight)``, kept between calls without gradients (sampling: the weights are quantised
        once, not at every step) and recomputed when the weight changes (in-place updates bump its version:
        an optimizer step, an EMA swap, ``load_state_dict``). Not a buffer: checkpoints stay stock."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        cached = self.__dict__.get("_fp8_weight")
        if cached is None or cached[0] != key:
            data, scale = quantize_rows(w.detach(), torch.float8_e4m3fn)
            cached = (key, data.contiguous(), scale)
            self.__dict__["_fp8_weight"] = cached
        return cached[1], cached[2]

    def extra_repr(self) -> str:
        name = self.recipe if isinstance(self.recipe, str) else repr(self.recipe)
        return f"{super().extra_repr()}, fp8 recipe={name}"


@dataclass
class Fp8Report:
    """What :func:`enable_fp8` switched: the Linear layers (qualified names) and the blocks whose norms now
    emit FP8 inputs; ``skipped``: Linear layers of those blocks that could not be switched, with why."""
    recipe: str
    linears: List[str] = field(default_factory=list)
    blocks: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = (f"fp8 ({self.recipe}): {len(self.linears)} Linear layers in {len(self.blocks)} blocks run as "
                f"FP8 GEMMs")
        text += f"; left in bf16: {', '.join(self.skipped)}" if self.skipped else ""
        return text + "".join(f"; {note}" for note in self.notes)


def _fp8_blocks(model: nn.Module):
    from fastdit.modules.blocks import DiTBlock, JointDiTBlock

    for name, module in model.named_modules():
        if isinstance(module, JointDiTBlock):
            yield name, module, _BLOCK_LINEARS["JointDiTBlock"]
        elif isinstance(module, DiTBlock):
            yield name, module, _BLOCK_LINEARS["DiTBlock"]


def _check_device(device: torch.device, backend: Optional[str], report: Fp8Report) -> None:
    """FP8 needs FP8 tensor cores on CUDA (a clear error at start-up, not a slow fallback per call); on the CPU
    it runs torch's dequantising ``_scaled_mm`` -- correct and slow -- and the report says so."""
    if resolve_backend(backend) == "reference":
        report.notes.append("backend='reference': every FP8 GEMM is the dequantising float reference (slow)")
    elif device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < CUDA_MIN_CAPABILITY:
            raise ValueError(f"enable_fp8: FP8 GEMMs need compute capability >= 8.9 (Ada, Hopper or newer); "
                             f"{torch.cuda.get_device_name(device)} is sm_{capability[0]}{capability[1]}: train "
                             f"with precision=bf16 on this GPU")
    elif device.type == "cpu":
        report.notes.append("on the CPU: torch._scaled_mm dequantises (the FP8 numerics, not its speed)")
    else:
        raise ValueError(f"enable_fp8: the model is on {device}; FP8 GEMMs run on CUDA (sm_89+) and the CPU")


def _layer_skip_reason(layer: nn.Linear, device: torch.device, backend: Optional[str]) -> Optional[str]:
    """Why ``layer`` stays in bf16 on ``device``: sizes CUDA's ``_scaled_mm`` cannot take (the CPU takes any)."""
    if device.type != "cuda" or resolve_backend(backend) == "reference":
        return None
    return _alignment_reason(layer.in_features, layer.out_features)


def enable_fp8(model: nn.Module, recipe: Union[str, Fp8Recipe] = "rowwise", backend: Optional[str] = None
               ) -> Fp8Report:
    """Switch every DiT / MMDiT block of ``model`` to FP8 (see the module docstring), in place.

    ``recipe``: a name of :data:`fastdit.ops.fp8_linear.RECIPES` or an Fp8Recipe. The fused FP8 inputs of qkv
    and fc1 are row-quantised, so a tensorwise recipe switches the GEMMs but leaves the norms as they are (the
    GEMM quantises its own input). ``backend``: for the FP8 GEMMs (None: the global default; "reference" = the
    dequantising float reference). Checked here, once, on the device the model is on: a CUDA GPU without FP8
    tensor cores (older than sm_89), or another device than CUDA and the CPU, is a ValueError; a layer whose
    sizes ``_scaled_mm`` cannot take on CUDA (not multiples of 16) stays in bf16 and is listed in
    ``report.skipped``; on the CPU ``report.notes`` says the GEMMs are emulated. Raises ValueError when
    ``model`` has no such block (a silent no-op would train in bf16 unnoticed). Call it after moving the model
    to its device (the trainer does)."""
    resolved = resolve_recipe(recipe)
    name = recipe if isinstance(recipe, str) else repr(recipe)
    report = Fp8Report(recipe=name)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    _check_device(device, backend, report)
    for block_name, block, linears in _fp8_blocks(model):
        for rel in linears:
            layer = block.get_submodule(rel)
            qualified = f"{block_name}.{rel}" if block_name else rel
            if type(layer) not in (nn.Linear, Fp8Linear):
                report.skipped.append(f"{qualified} ({type(layer).__name__} is not a plain nn.Linear)")
                continue
            reason = _layer_skip_reason(layer, device, backend)
            if reason:
                report.skipped.append(f"{qualified} ({reason})")  # stays in bf16 (said once, in the report)
                continue
            layer.__class__ = Fp8Linear
            layer.recipe, layer.backend = recipe, backend
            report.linears.append(qualified)
        block.fp8_inputs = resolved.scaling == "rowwise"
        report.blocks.append(block_name)
    for block_name, block in model.named_modules():
        kind = type(block).__name__
        if kind in ("ContextPreOnlyJointBlock", "SingleStreamDiTBlock"):
            report.skipped.append(f"{block_name} ({kind}: not switched by this FP8 mode)")
    if not report.blocks:
        raise ValueError(f"enable_fp8: {type(model).__name__} has no DiTBlock or JointDiTBlock (FP8 mode "
                         f"switches those blocks' Linear layers)")
    return report


def disable_fp8(model: nn.Module) -> int:
    """Undo :func:`enable_fp8` in place: Fp8Linear layers become ``nn.Linear`` again and the blocks' norms
    stop emitting FP8 inputs. Returns how many layers were switched back."""
    count = 0
    for module in model.modules():
        if type(module) is Fp8Linear:
            module.__class__ = nn.Linear
            for attribute in ("recipe", "backend", "_fp8_weight"):
                module.__dict__.pop(attribute, None)
            count += 1
        if hasattr(module, "fp8_inputs"):
            module.fp8_inputs = False
    return count


def fp8_enabled(model: nn.Module) -> bool:
    """Whether any Linear layer of ``model`` runs as an FP8 GEMM."""
    return any(type(module) is Fp8Linear for module in model.modules())
