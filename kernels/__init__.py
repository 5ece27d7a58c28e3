"""Triton kernels and their launchers. Installed as ``fastdit.kernels`` (never as a top-level
``kernels``: that import name belongs to the Hugging Face package that diffusers probes for).

One op per file; ``@triton.jit`` kernels are private, launchers allocate outputs and pick grids.
Importing a kernel module needs triton; nothing here is imported by ``import fastdit``.
"""
