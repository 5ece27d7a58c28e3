"""Package discovery for fastdit.

`kernels/` at the top of the repository installs as the subpackage `fastdit.kernels`. The import name
`kernels` belongs to the Hugging Face `kernels` package (diffusers probes for it), so fastdit must
never install a top-level module of that name; tests/test_packaging.py checks the built wheel.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["fastdit", "fastdit.*"])
packages += ["fastdit.kernels"] + [f"fastdit.kernels.{name}" for name in find_packages("kernels")]

setup(packages=packages, package_dir={"fastdit.kernels": "kernels"})
