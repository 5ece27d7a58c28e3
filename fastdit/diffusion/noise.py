"""Per-sample noise for samplers: a sample's noise does not depend on the batch it is drawn in.

Every sample owns a CPU ``torch.Generator`` seeded from its own seed. The initial noise and every later
draw (ancestral / stochastic-DDIM steps) for sample i come only from generator i, and the seeds themselves are
drawn one at a time from the caller's seed or generator. So sample i is the same whether it is drawn in a
batch of 1, 4 or 64 (the first k samples of a larger batch equal a batch of k), and on any device (noise
is made on the CPU and copied over). The model's own arithmetic may still differ in the last bits between
batch sizes or devices.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

_SEED_HIGH = 2 ** 62


class PerSampleNoise:
    """Gaussian noise, one CPU generator per sample.

    Args:
        seeds: one integer seed per sample.
    """

    def __init__(self, seeds: Sequence[int]):
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("PerSampleNoise needs at least one seed")
        self.seeds = seeds
        self.generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]

    @property
    def batch_size(self) -> int:
        return len(self.generators)

    @classmethod
    def create(cls, batch_size: int, seed: Union[None, int, Sequence[int]] = None,
               generator: Optional[torch.Generator] = None) -> "PerSampleNoise":
        """Per-sample seeds from an int ``seed`` (as if from ``torch.Generator().manual_seed(seed)``), an explicit
        list of ``batch_size`` seeds, a ``generator``, or, with neither, torch's global CPU RNG.

        Seeds are drawn one per call so that the i-th seed does not depend on how many are drawn."""
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if seed is not None and not isinstance(seed, int):
            seeds = [int(s) for s in seed]
            if len(seeds) != batch_size:
                raise ValueError(f"got {len(seeds)} seeds for a batch of {batch_size}")
            return cls(seeds)
        if isinstance(seed, int):
            generator = torch.Generator(device="cpu").manual_seed(seed)
        device = generator.device if generator is not None else torch.device("cpu")
        seeds = [int(torch.randint(0, _SEED_HIGH, (1,), generator=generator, device=device))
                 for _ in range(batch_size)]
        return cls(seeds)

    def randn(self, sample_shape: Sequence[int], device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, *sample_shape) standard normal noise, drawn in float32 on the CPU, returned on device/dtype."""
        out = torch.stack([torch.randn(tuple(sample_shape), generator=g) for g in self.generators])
        return out.to(device=device, dtype=dtype)
