"""The bench registry: what a benchmark case is, and the list of cases ``fastdit bench`` runs.

A :class:`Case` is one operation or model step at a set of named shapes (``"dit-xl2"``, ``"seq4096"``, ...).
``Case.make(ctx, shape, params)`` builds a :class:`Workload`: the inputs at that shape, the work it does
(bytes, FLOPs, items), a reference result and a check, and its :class:`Peer` s -- ``"fastdit"`` first,
then every stock alternative (eager, ``torch.compile``, SDPA backends, installed libraries). The runner
(:mod:`fastdit.bench.runner`) times every peer in one process and checks each result against the
reference.

Case modules (``fastdit/bench/cases_*.py``) call :func:`register` at import; :func:`all_cases` imports
them and returns their cases in group order, then registration order.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

GROUPS = ("kernels", "attention", "modules", "train", "sample", "diffusers")

# the modules that register cases, imported by all_cases() in this order (a missing file is skipped)
CASE_MODULES = tuple(f"fastdit.bench.cases_{group}" for group in GROUPS)

CPU_MEMORY_BYTES = 2 * 2**30  # what shapes may assume on the CPU (tiny shapes use far less)


@dataclass
class Context:
    """Where and how a bench run happens; handed to every ``Case.make``.

    ``dtype`` is bf16 on the GPU and fp32 on the CPU (Triton's interpreter computes a bf16 ``tl.dot``
    wrongly). ``memory_bytes`` is the device memory a workload may use (GPU: 90% of the total; CPU:
    2 GiB), for cases that size their shapes. Random data comes from the context's private generators,
    never the global RNG."""
    device: torch.device
    quick: bool
    dtype: torch.dtype
    memory_bytes: int
    seed: int = 0
    _randn_generator: Optional[torch.Generator] = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def create(cls, device: "str | torch.device" = "auto", quick: bool = False, seed: int = 0) -> "Context":
        """The context for ``device`` (``"auto"``: CUDA when available, else the CPU). The CPU always runs
        quick shapes in fp32; a GPU runs bf16 with 90% of its memory available."""
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("device cuda was asked for, but torch sees no CUDA GPU")
            index = device.index if device.index is not None else torch.cuda.current_device()
            device = torch.device("cuda", index)
            total = torch.cuda.get_device_properties(index).total_memory
            return cls(device=device, quick=quick, dtype=torch.bfloat16, memory_bytes=int(total * 0.9), seed=seed)
        if device.type != "cpu":
            raise ValueError(f"fastdit bench runs on cuda or cpu, not {device}")
        return cls(device=device, quick=True, dtype=torch.float32, memory_bytes=CPU_MEMORY_BYTES, seed=seed)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def generator(self) -> torch.Generator:
        """A fresh generator on the device, seeded with ``seed`` (the same stream each call)."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed)
        return generator

    def randn(self, *shape: int, dtype: Optional[torch.dtype] = None, requires_grad: bool = False) -> Tensor:
        """Standard-normal data on the device in ``dtype`` (default ``self.dtype``); successive calls draw
        successive values from one private generator seeded with ``seed``."""
        if self._randn_generator is None:
            self._randn_generator = self.generator()
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        t = torch.randn(*shape, device=self.device, dtype=dtype or self.dtype, generator=self._randn_generator)
        return t.requires_grad_(requires_grad)

    def describe(self) -> Dict[str, Any]:
        """The context as plain JSON-able values."""
        return {"device": str(self.device), "quick": self.quick, "dtype": str(self.dtype).replace("torch.", ""),
                "memory_bytes": self.memory_bytes, "seed": self.seed}


@dataclass
class Peer:
    """One implementation of a workload. ``build()`` does the untimed setup (inputs, a lazily compiled
    model) and returns the zero-argument callable that is timed; it must be repeatable. A peer that
    cannot run here has ``build=None`` and ``skip`` saying why."""
    name: str
    build: Optional[Callable[[], Callable[[], Any]]]
    skip: Optional[str] = None

    def __post_init__(self):
        if self.build is None and not self.skip:
            raise ValueError(f"peer {self.name!r} has no build function and no skip reason")


@dataclass
class Workload:
    """One case at one shape, with the peers to time on it.

    ``bytes``: what a memory-bound op must move (each input read once, each output written once) -> GB/s
    and the fraction of the copy ceiling. ``flops``: true FLOPs per call -> TFLOP/s and the fraction of
    the matmul ceiling. ``items``: items per call (``item_unit``, e.g. "img") -> items/s.
    ``reference()`` computes the reference result once; ``check(result, reference) -> (ok, detail)``
    judges each peer's result from one untimed call."""
    group: str
    name: str
    shape: str
    dims: str
    peers: List[Peer]
    bytes: Optional[float] = None
    flops: Optional[float] = None
    items: Optional[float] = None
    item_unit: str = ""
    reference: Optional[Callable[[], Any]] = None
    check: Optional[Callable[[Any, Any], Tuple[bool, str]]] = None


@dataclass
class Case:
    """An operation or step at named shapes: ``shapes`` at full size, ``quick_shapes`` for ``--quick``
    and the CPU. ``make(ctx, shape_name, params)`` builds the :class:`Workload` (it may raise: the runner
    records the error). ``peers`` optionally names the peers in advance, for ``fastdit bench --list``."""
    group: str
    name: str
    shapes: Dict[str, Any]
    quick_shapes: Dict[str, Any]
    make: Callable[[Context, str, Any], Workload]
    peers: Tuple[str, ...] = ()

    def shapes_for(self, ctx: Context) -> Dict[str, Any]:
        """The shapes this context runs: the quick ones when ``ctx.quick``, else the full ones."""
        return self.quick_shapes if ctx.quick else self.shapes

    @property
    def shape_names(self) -> List[str]:
        """Every shape name of the case, full then quick-only ones."""
        return list(self.shapes) + [name for name in self.quick_shapes if name not in self.shapes]


_CASES: List[Case] = []


def register(case: Case) -> Case:
    """Add ``case`` to the registry (case modules call this at import) and return it. Case names are
    unique; the group must be one of :data:`GROUPS`."""
    if case.group not in GROUPS:
        raise ValueError(f"case {case.name!r}: unknown group {case.group!r}; groups are {', '.join(GROUPS)}")
    for known in _CASES:
        if known.name == case.name:
            raise ValueError(f"a case named {case.name!r} is registered already (group {known.group!r})")
    _CASES.append(case)
    return case


def _import_case_module(module: str) -> None:
    """Import a case module; skip it silently only when its file does not exist."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == module and importlib.util.find_spec(module) is None:
            return
        raise


def all_cases() -> List[Case]:
    """Every registered case, after importing the case modules that exist: in :data:`GROUPS` order, then
    in registration order. An import error inside a case module is raised, not hidden."""
    for module in CASE_MODULES:
        _import_case_module(module)
    return sorted(_CASES, key=lambda case: GROUPS.index(case.group))


def _split(values: "Optional[Iterable[str] | str]") -> Optional[List[str]]:
    if values is None:
        return None
    if isinstance(values, str):
        values = values.split(",")
    values = [v.strip() for v in values if v and v.strip()]
    return values or None


def select(cases: Sequence[Case], groups: "Optional[Iterable[str] | str]" = None,
           shapes: "Optional[Iterable[str] | str]" = None) -> List[Case]:
    """The cases of ``groups`` (default all), each cut down to the shapes named in ``shapes`` (default
    all); cases left with no shape are dropped. ``groups`` and ``shapes`` are lists or comma-separated
    strings. An unknown group or shape raises ValueError listing the valid ones (shapes: those of the
    selected groups' cases)."""
    groups, shapes = _split(groups), _split(shapes)
    if groups is not None:
        unknown = [g for g in groups if g not in GROUPS]
        if unknown:
            raise ValueError(f"unknown group{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                             f"valid groups: {', '.join(GROUPS)}")
        cases = [case for case in cases if case.group in groups]
    else:
        cases = list(cases)
    if shapes is None:
        return cases
    valid = []
    for case in cases:
        valid += [name for name in case.shape_names if name not in valid]
    unknown = [s for s in shapes if s not in valid]
    if unknown:
        where = f" of group{'s' if groups and len(groups) > 1 else ''} {', '.join(groups)}" if groups else ""
        raise ValueError(f"unknown shape{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; valid shapes"
                         f"{where}: {', '.join(valid) if valid else '(none)'}")
    chosen = []
    for case in cases:
        full = {k: v for k, v in case.shapes.items() if k in shapes}
        quick = {k: v for k, v in case.quick_shapes.items() if k in shapes}
        if full or quick:
            chosen.append(dataclasses.replace(case, shapes=full, quick_shapes=quick))
    return chosen
