"""fastdit.bench.report: bench.json, summary.md, the plots, the README block and its script."""
import copy
import importlib.util
import json
from pathlib import Path

import pytest

from fastdit.bench.report import (CPU_WARNING, README_BEGIN, README_END, _num, readme_tables, summary_markdown,
                                  write_report)

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "readme_tables.py"


@pytest.fixture(scope="module")
def report_dir(fake_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "cpu_run"
    paths = write_report(fake_run, out)
    assert set(paths) == {"bench.json", "summary.md", "speedup_kernels.png", "attention_vs_seqlen.png",
                          "end_to_end.png"}  # no memory.png: the CPU measures no peak memory
    return out


def test_the_files_are_written_and_non_empty(report_dir):
    for name in ("bench.json", "summary.md", "speedup_kernels.png", "attention_vs_seqlen.png", "end_to_end.png"):
        assert (report_dir / name).stat().st_size > 0, name
    assert (report_dir / "speedup_kernels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (report_dir / "memory.png").exists()


def test_bench_json_holds_everything(report_dir, fake_run):
    data = json.loads((report_dir / "bench.json").read_text())
    for key in ("gpu", "driver", "cuda", "cudnn", "torch", "triton", "python", "fastdit", "git_commit", "date"):
        assert key in data["environment"]
    assert data["ceilings"]["copy_GBps"] == 10.0 and data["ceilings"]["fp8_matmul_TFLOPs"] is None
    assert data["context"]["device"] == "cpu" and data["context"]["quick"] is True
    assert len(data["rows"]) == len(fake_run.rows) == 6
    assert data["rows"][0]["fastest_stock"]["peer"] == "eager"
    assert data["files"] == ["bench.json", "summary.md", "speedup_kernels.png", "attention_vs_seqlen.png",
                             "end_to_end.png"]


def test_summary_names_every_peer_the_reasons_and_the_cpu_warning(report_dir):
    text = (report_dir / "summary.md").read_text()
    assert text.startswith("# fastdit bench — CPU")
    assert text.count(CPU_WARNING) == 2  # at the top and at the bottom
    for peer in ("fastdit", "eager", "wrong", "raises", "oom", "missing-lib", "sdpa-math"):
        assert f"| {peer}" in text, peer
    for needle in ("## kernels", "## attention", "## train", "commit 0123456789abcdef-test", "copy 10.0 GB/s",
                   "fp8 matmul: skipped (fp8 matmul needs a CUDA GPU)", "RuntimeError: backend exploded",
                   "OutOfMemoryError: CUDA out of memory", "missing-lib is not installed",
                   "ValueError: cannot build shape tiny", "**wrong** check FAILED", "eager (fastest stock)",
                   "- **missing-lib** skipped (2 workloads: `fake.matmul` [tiny], `fake.matmul` [small]) — "
                   "missing-lib is not installed",
                   "vs fastest stock:", "img/s", "GB/s (", "TFLOP/s ("):
        assert needle in text, needle


def test_the_memory_plot_is_written_when_there_is_peak_memory(fake_run, tmp_path):
    data = copy.deepcopy(fake_run.to_dict())
    for row in data["rows"]:
        for peer in row["peers"]:
            if peer["status"] == "ok":
                peer["peak_memory_bytes"] = 3 * 2**20
    paths = write_report(data, tmp_path / "with_memory")
    assert paths["memory.png"].stat().st_size > 0
    assert "3.0 MiB" in paths["summary.md"].read_text()


def test_a_plot_without_data_is_not_written(fake_run, tmp_path):
    data = fake_run.to_dict()
    data["rows"] = [row for row in data["rows"] if row["group"] == "attention"]
    assert sorted(write_report(data, tmp_path / "attention_only")) == ["attention_vs_seqlen.png", "bench.json",
                                                                       "summary.md"]


def test_a_report_is_never_overwritten(fake_run, report_dir):
    before = (report_dir / "bench.json").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a report"):
        write_report(fake_run, report_dir)
    assert (report_dir / "bench.json").read_bytes() == before


def test_the_readme_block_has_the_headline_and_links(report_dir):
    block = readme_tables(report_dir / "bench.json", relative_to=report_dir.parent)
    assert "Measured by `fastdit bench` on **the CPU**" in block and CPU_WARNING in block
    assert "| kernels | fake.matmul | tiny |" in block and "eager (" in block and "×**" in block
    assert "| kernels | fake.broken | tiny | — | — | workload failed: ValueError: cannot build shape tiny |" in block
    assert "[summary.md](cpu_run/summary.md)" in block
    assert "[kernel speed-ups](cpu_run/speedup_kernels.png)" in block and "memory.png" not in block


def _script():
    spec = importlib.util.spec_from_file_location("readme_tables_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_script_replaces_the_block_between_the_markers(report_dir, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{README_BEGIN}\nold table\n{README_END}\n\nrest\n")
    assert _script().main([str(report_dir / "bench.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f"# title\n\n{README_BEGIN}\nMeasured by") and text.endswith(f"\n{README_END}\n\nrest\n")
    assert "old table" not in text and "| kernels | fake.matmul |" in text
    assert _script().main([str(report_dir / "bench.json"), "--readme", str(readme)]) == 0
    assert readme.read_text() == text and "is up to date" in capsys.readouterr().out


def test_the_readme_script_refuses_without_markers(report_dir, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{README_END}\n{README_BEGIN}\n")
    assert _script().main([str(report_dir / "bench.json"), "--readme", str(readme)]) == 2
    assert "no <!-- bench:begin --> ... <!-- bench:end --> block" in capsys.readouterr().err
    assert readme.read_text() == f"# title\n{README_END}\n{README_BEGIN}\n"


def test_numbers_are_short_and_never_exponents():
    assert [_num(v) for v in (None, 0, 1.23e-5, 0.01234, 1.2345, 12.345, 123.45, 2966.4)] == \
        ["—", "0", "0.0000123", "0.0123", "1.23", "12.3", "123.5", "2,966"]


def test_summary_of_a_gpu_run_has_no_cpu_warning(fake_run):
    data = copy.deepcopy(fake_run.to_dict())
    data["context"]["device"] = "cuda:0"
    data["environment"].update(gpu="NVIDIA H100 80GB HBM3", sm_count=132, gpu_memory_GiB=79.1, driver="550.54")
    text = summary_markdown(data)
    assert CPU_WARNING not in text and text.startswith("# fastdit bench — NVIDIA H100 80GB HBM3")
    assert "| driver | 550.54 |" in text
