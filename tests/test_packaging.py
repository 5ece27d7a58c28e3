"""The wheel maps kernels/ to fastdit.kernels and never ships a top-level `kernels` module (that name is
the Hugging Face package diffusers probes for)."""
import importlib.util
import pathlib
import subprocess
import sys
import zipfile

import pytest

import fastdit
import fastdit.kernels

ROOT = pathlib.Path(fastdit.__file__).resolve().parent.parent


def test_kernels_are_a_subpackage_of_fastdit():
    assert fastdit.kernels.__name__ == "fastdit.kernels"
    spec = importlib.util.find_spec("kernels")
    # Either no top-level `kernels` at all, or someone else's (e.g. Hugging Face's), never ours.
    assert spec is None or pathlib.Path(spec.origin).resolve().parent != (ROOT / "kernels").resolve()


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs the source tree (editable install)")
def test_built_wheel_has_fastdit_kernels_and_no_top_level_kernels(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("fastdit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert "kernels" not in top_level, sorted(top_level)
    assert "fastdit/kernels/__init__.py" in names
    # every Python file of the source packages is in the wheel, kernels under their mapped name
    expected = {f"fastdit/{p.relative_to(ROOT / 'fastdit').as_posix()}" for p in (ROOT / "fastdit").rglob("*.py")}
    expected |= {f"fastdit/kernels/{p.relative_to(ROOT / 'kernels').as_posix()}"
                 for p in (ROOT / "kernels").rglob("*.py")}
    assert expected <= set(names), sorted(expected - set(names))
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fastdit = fastdit.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
