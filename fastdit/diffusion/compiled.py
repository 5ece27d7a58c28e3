"""A compiled sampling step: the guided prediction of one step as one ``torch.compile`` graph with static shapes
(CUDA graphs on CUDA), behind :class:`~fastdit.diffusion.guidance.GuidedDenoiser`'s call interface.

``sample(..., compile=True)`` (and ``fastdit sample --compile``) runs every step's model work through
:class:`CompiledDenoiser`. Per run there are at most two graphs, compiled with ``fullgraph=True, dynamic=False``:

- guided: x, t and every conditioning tensor concatenated with the unconditional half, one model call on 2B,
  the split, ``uncond + scale * (cond - uncond)`` and the cut of learned-sigma channels, all in one graph;
- unguided (``cfg_scale = 1``, or outside the guidance interval): the conditional call and the cut.

Timesteps and the guidance scale enter as tensors, so the step's time never specialises a graph: a 50-step run
compiles each graph once and replays it. On CUDA the graphs are compiled with ``mode="reduce-overhead"`` (CUDA
graphs: each step is one graph launch); elsewhere with the default mode.

The compiled graphs of a model live in a :class:`CompiledPrediction` kept per model (weakly: it goes with the
model), so a second run with the same shapes reuses them. Each new shape signature (batch, latent shape and
dtype, conditioning shapes and dtypes, guided or not, device, autocast, train/eval) prints one line to stderr
before it compiles; a recompile that no new signature explains (something the graph depends on changed besides
the shapes, e.g. the model's dtype) prints one line too, so that no step silently pays a compile.
"""
from __future__ import annotations

import sys
import weakref
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Set, Tuple

import torch

from fastdit.diffusion._common import Cond, check_cond, split_prediction
from fastdit.diffusion.guidance import GuidedDenoiser, _batch_uncond

Prediction = Tuple[torch.Tensor, Optional[torch.Tensor]]


def guided_prediction(model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, cond: Dict[str, Any],
                      uncond: Dict[str, Any], scale: torch.Tensor) -> Prediction:
    """The classifier-free guided prediction from one batched model call (what the guided graph traces).

    x (B, C, ...), t (B,), cond / uncond the model's keyword arguments (tensors of batch size B, same keys and
    shapes), scale a 0-d tensor. Returns ``(uncond + scale * (cond - uncond)`` (B, C, ...), the learned-sigma
    channels of the conditional half (B, C, ...) or None), as :class:`GuidedDenoiser` does.
    """
    batch = x.shape[0]
    both = {k: torch.cat([v, uncond[k]]) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
    x_both = torch.cat([x, x])
    pred, extra = split_prediction(model(x_both, torch.cat([t, t]), **both), x_both)
    cond_pred, uncond_pred = pred[:batch], pred[batch:]
    return uncond_pred + scale * (cond_pred - uncond_pred), (extra[:batch] if extra is not None else None)


def conditional_prediction(model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                           cond: Dict[str, Any]) -> Prediction:
    """The unguided prediction (what the unguided graph traces): ``split_prediction(model(x, t, **cond), x)``."""
    return split_prediction(model(x, t, **cond), x)


def _graphs_compiled() -> int:
    """How many graphs Dynamo has compiled in this process (its own counter; it only grows)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class Signature(NamedTuple):
    """What a compiled graph is specialised on (Dynamo guards on all of it): a new one compiles a new graph.

    Conditioning entries are ``(key, (shape, dtype))`` for tensors, ``(key, repr(value))`` for other values
    (Dynamo bakes those in). No strides: :class:`CompiledDenoiser` passes contiguous tensors.
    """

    guided: bool
    device: str
    x_shape: Tuple[int, ...]
    x_dtype: torch.dtype
    t_shape: Tuple[int, ...]
    t_dtype: torch.dtype
    cond: Tuple[Tuple[str, Any], ...]
    autocast: Optional[torch.dtype]  # the autocast dtype of x's device type; None when autocast is off
    training: Optional[bool]  # the model's train/eval mode (None for a plain callable)

    @classmethod
    def of(cls, model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, cond: Dict[str, Any],
           guided: bool) -> "Signature":
        device_type = x.device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        cond_key = tuple((k, (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else repr(v))
                         for k, v in sorted(cond.items()))
        return cls(guided, str(x.device), tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, cond_key, autocast,
                   getattr(model, "training", None))

    def describe(self) -> str:
        """In words, for the line printed when it compiles, e.g. ``batch 8, latents (4, 32, 32) float32, y (8,)
        int64, guided (cond + uncond as one batch of 16) on cpu``."""
        batch = self.x_shape[0]
        words = [f"batch {batch}, latents {self.x_shape[1:]} {_name(self.x_dtype)}"]
        words += [f"{k} {v[0]} {_name(v[1])}" if isinstance(v, tuple) else f"{k}={v}" for k, v in self.cond]
        words.append(f"guided (cond + uncond as one batch of {2 * batch})" if self.guided else "unguided")
        if self.autocast is not None:
            words.append(f"autocast {_name(self.autocast)}")
        cuda_graphs = " with CUDA graphs" if self.device.startswith("cuda") else ""
        return ", ".join(words) + f" on {self.device}{cuda_graphs}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class CompiledPrediction:
    """The compiled guided and unguided predictions of one model, and the shape signatures compiled so far.

    ``compiled(model, x, t, cond, uncond, scale)`` returns what :func:`guided_prediction` (``uncond`` given) or
    :func:`conditional_prediction` (``uncond`` None) would, through a ``torch.compile(fullgraph=True,
    dynamic=False)`` graph. The model is an argument rather than an attribute so that this object, kept per
    model in a weak dictionary, does not keep the model alive.

    On CUDA each call starts a new CUDA-graph step (``torch.compiler.cudagraph_mark_step_begin``) and returns
    clones: a graph's outputs live in its memory pool and the next replay overwrites them, while a sampler may
    still hold the previous step's prediction (Heun does). Elsewhere the outputs are returned as they come.

    ``signatures`` holds the signatures compiled so far; a new one prints a line to stderr before compiling.
    """

    def __init__(self):
        self.signatures: Set[Signature] = set()
        self._compiled: Dict[Tuple[bool, bool], Callable[..., Prediction]] = {}

    def _function(self, guided: bool, cuda_graphs: bool) -> Callable[..., Prediction]:
        key = (guided, cuda_graphs)
        if key not in self._compiled:
            fn = guided_prediction if guided else conditional_prediction
            self._compiled[key] = torch.compile(fn, fullgraph=True, dynamic=False,
                                                mode="reduce-overhead" if cuda_graphs else None)
        return self._compiled[key]

    def __call__(self, model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, cond: Dict[str, Any],
                 uncond: Optional[Dict[str, Any]] = None, scale: Optional[torch.Tensor] = None) -> Prediction:
        guided = uncond is not None
        cuda_graphs = x.device.type == "cuda"
        signature = Signature.of(model, x, t, cond, guided)
        new = signature not in self.signatures
        if new:
            print(f"fastdit.sample: compiling the denoiser step for {signature.describe()}", file=sys.stderr,
                  flush=True)
        args = (model, x, t, cond, uncond, scale) if guided else (model, x, t, cond)
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        graphs_before = _graphs_compiled()
        try:
            pred, extra = self._function(guided, cuda_graphs)(*args)
        except torch._dynamo.exc.TorchDynamoException:
            # Dynamo wraps an error raised while tracing (a model output of the wrong shape, say) in its own
            # exception; the same function run eagerly raises the model's error as is. When that runs, the model
            # really cannot be captured as one graph (or Inductor failed) and Dynamo's error says why.
            (guided_prediction if guided else conditional_prediction)(*args)
            raise
        self.signatures.add(signature)
        if not new and _graphs_compiled() != graphs_before:
            print(f"fastdit.sample: recompiled the denoiser step for an already compiled {signature.describe()}: "
                  f"something besides the shapes changed (TORCH_LOGS=recompiles names it)", file=sys.stderr,
                  flush=True)
        if cuda_graphs:
            pred, extra = pred.clone(), (extra.clone() if extra is not None else None)
        return pred, extra


_PER_MODEL: "weakref.WeakKeyDictionary[Any, CompiledPrediction]" = weakref.WeakKeyDictionary()


def compiled_prediction_for(model: Callable[..., torch.Tensor]) -> CompiledPrediction:
    """The :class:`CompiledPrediction` of ``model``, made on first use and kept as long as the model lives. A
    model that cannot be weakly referenced or hashed gets a new one each time (its signatures then compile and
    print again in every run)."""
    if not callable(model):
        raise ValueError(f"compile=True needs a model that is an nn.Module or a callable model(x, t, **cond), "
                         f"got {type(model).__name__}")
    try:
        return _PER_MODEL.setdefault(model, CompiledPrediction())
    except TypeError:
        return CompiledPrediction()


class CompiledDenoiser(GuidedDenoiser):
    """A :class:`GuidedDenoiser` whose model work runs through the model's compiled graphs
    (:func:`compiled_prediction_for`): same arguments, same call ``denoiser(x, t_model, t_norm)`` returning
    ``(prediction (B, C, ...), extra (B, C, ...) or None)``, same guidance interval and ``calls`` count.

    The conditioning tensors are checked (and uncond broadcast to batch B) as :class:`GuidedDenoiser` does, then
    made contiguous once per batch size, so that their strides never make a new graph. The guidance scale is a
    0-d tensor (float32, float64 for float64 latents: the precision a Python float gets in eager arithmetic).
    """

    def __init__(self, model: Callable[..., torch.Tensor], cond: Cond = None, uncond: Cond = None,
                 scale: float = 1.0, interval: Optional[Sequence[float]] = None):
        self.compiled = compiled_prediction_for(model)
        super().__init__(model, cond, uncond, scale, interval)
        self._inputs: Optional[Tuple[int, Dict[str, Any], Optional[Dict[str, Any]]]] = None
        self._scale_tensor: Optional[torch.Tensor] = None

    def _model_inputs(self, batch: int, guided: bool) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
        """(cond, uncond or None) for a batch; uncond is checked at the first guided call, as eager does."""
        if self._inputs is None or self._inputs[0] != batch:
            self._inputs = (batch, _contiguous(check_cond(self.cond, batch)), None)
        if guided and self._inputs[2] is None:
            self._inputs = (batch, self._inputs[1], _contiguous(_batch_uncond(self._inputs[1], self.uncond, batch)))
        return self._inputs[1], (self._inputs[2] if guided else None)

    def __call__(self, x: torch.Tensor, t_model: torch.Tensor, t_norm: float):
        guided = self.guides_at(t_norm)
        cond, uncond = self._model_inputs(x.shape[0], guided)
        self.calls += 1
        if not guided:
            return self.compiled(self.model, x, t_model, cond)
        dtype = torch.promote_types(x.dtype, torch.float32)
        if self._scale_tensor is None or self._scale_tensor.device != x.device or self._scale_tensor.dtype != dtype:
            self._scale_tensor = torch.tensor(self.scale, dtype=dtype, device=x.device)
        return self.compiled(self.model, x, t_model, cond, uncond, self._scale_tensor)


def _contiguous(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
