"""Which implementation an op runs: the backend switch.

Three backends:

- ``"reference"``: stock PyTorch ops, what you would write without fastdit. Runs anywhere and is what
  ``torch.compile`` sees as ordinary code.
- ``"triton"``: fastdit's ``torch.library`` op, which launches the Triton kernel where one exists for
  the op and the inputs; inputs the kernel cannot take raise a ``ValueError`` naming the reason.
- ``"auto"`` (default): the Triton op on CUDA when it supports the inputs, the reference otherwise.

Precedence, highest first: the ``backend=`` argument of an op or module, the innermost
:func:`use_backend` context, the ``FASTDIT_BACKEND`` environment variable (read once, at import),
``"auto"``. The context is process-global (like ``torch.backends`` flags), not per thread.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "FASTDIT_BACKEND"


def _validate(name: object, where: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{where}: unknown fastdit backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


class _State:
    # A plain attribute (not a ContextVar or thread-local) so that torch.compile can read and guard
    # on it without a graph break.
    default: str = "auto"


_state = _State()
_env_value = os.environ.get(ENV_VAR)
if _env_value:
    _state.default = _validate(_env_value.strip().lower(), f"environment variable {ENV_VAR}")


def get_backend() -> str:
    """The backend used when an op or module is given none (``backend=None``)."""
    return _state.default


def set_backend(name: str) -> None:
    """Set the process-wide default backend (prefer :func:`use_backend`, which restores it)."""
    _state.default = _validate(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the enclosed code with ``name`` as the default backend::

        with fastdit.use_backend("reference"):
            loss = model(x).square().mean()
    """
    previous = _state.default
    _state.default = _validate(name, "use_backend")
    try:
        yield name
    finally:
        _state.default = previous


def resolve_backend(requested: Optional[str]) -> str:
    """``requested`` if given (validated), else the current default."""
    if requested is None:
        return _state.default
    return _validate(requested, "backend")


def pick_device(name: str):
    """A ``torch.device`` from a command-line style name: ``"auto"`` is CUDA when available, else the CPU;
    anything else is a torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``). A CUDA device without
    CUDA, or a name torch does not know, is a ``ValueError`` saying so."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return device
