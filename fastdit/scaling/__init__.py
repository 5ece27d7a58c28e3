"""Scaling-law studies: train a grid of DiT sizes × training budgets and fit loss and sample quality
against training compute (``fastdit scaling``).

- :mod:`fastdit.scaling.spec`: the grid spec (sizes, budgets) and the study's settings, parsed and checked;
- :mod:`fastdit.scaling.data`: the digits (or configured) data and the held-out set;
- :mod:`fastdit.scaling.point`: one grid point: its config, parameters and FLOPs, training, result and resume;
- :mod:`fastdit.scaling.evaluate`: held-out loss and sample quality (FD, precision / recall) of a model;
- :mod:`fastdit.scaling.plan`: the plan table and the wall-time estimate;
- :mod:`fastdit.scaling.study`: the driver: prepare, run the grid, write scaling.json;
- :mod:`fastdit.scaling.files`: the study folder's layout and atomic writes;
- :mod:`fastdit.scaling.fit`: ``L(C) = a C^-b + c`` fits with confidence intervals, the compute frontier;
- :mod:`fastdit.scaling.plot`: scaling.png.
"""
from fastdit.scaling.fit import FitError, PowerLawFit, compute_frontier, fit_grid, fit_power_law
from fastdit.scaling.point import GridPoint
from fastdit.scaling.spec import GridError, ModelSize, ScalingConfig, parse_budgets, parse_size, parse_sizes
from fastdit.scaling.study import Study

__all__ = ["FitError", "PowerLawFit", "compute_frontier", "fit_grid", "fit_power_law", "GridError", "GridPoint",
           "ModelSize", "ScalingConfig", "Study", "parse_budgets", "parse_size", "parse_sizes"]
