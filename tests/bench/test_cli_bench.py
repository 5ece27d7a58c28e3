"""`fastdit bench`: selection errors, --list, the CPU warning, --out never overwriting, the report, and one
real run of the kernels group on the CPU."""
import datetime
import importlib.util
import json

import pytest
import torch

from fastdit.bench import registry
from fastdit.bench.registry import Case, Peer, Workload
from fastdit.cli import COMMANDS
from fastdit.cli import main as fastdit_main
from fastdit.cli.bench import CPU_WARNING, main, unused_folder

CPU = ["--device", "cpu", "--no-progress"]


@pytest.fixture
def fake_registry(monkeypatch, cases):
    """`fastdit bench` sees the fake cases only (fixed ceilings would hide nothing the CLI does)."""
    monkeypatch.setattr(registry, "all_cases", lambda: list(cases))
    return cases


def test_bench_is_a_fastdit_command(capsys):
    assert COMMANDS["bench"][0] == "fastdit.cli.bench"
    with pytest.raises(SystemExit) as exc:
        fastdit_main(["bench", "--help"])
    assert exc.value.code == 0 and "--group" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--group", "kernels,nope"], "unknown group nope; valid groups: kernels, attention, modules, train, sample, "
                                  "diffusers"),
    (["--group", "kernels", "--shape", "seq8"], "unknown shape seq8; valid shapes of group kernels: big, tiny, small"),
])
def test_unknown_groups_and_shapes_exit_2_naming_the_valid_ones(fake_registry, argv, message, capsys):
    assert main(argv + CPU) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_exits_2(fake_registry, capsys):
    assert main(["--device", "cuda"]) == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err


def test_list_prints_groups_cases_shapes_and_peers(fake_registry, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("groups: kernels, attention, modules, train, sample, diffusers\nkernels:\n  fake.matmul\n")
    assert "    shapes: big\n    quick shapes: tiny, small\n    peers: fastdit, eager, wrong" in out
    assert "train:\n  fake.train" in out and "modules:" not in out
    assert main(["--list", "--group", "attention"]) == 0
    assert "fake.matmul" not in capsys.readouterr().out
    assert not (tmp_path / "benchmarks").exists()  # --list writes nothing


def test_a_cpu_run_warns_writes_the_report_and_prints_the_headline(fake_registry, tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "report"
    assert main(["--group", "kernels,train"] + CPU + ["--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert CPU_WARNING in captured.err and CPU_WARNING in captured.out
    assert "| kernels | fake.matmul | tiny |" in captured.out and "| train | fake.train | b4 |" in captured.out
    assert f"report: {out / 'summary.md'}" in captured.out
    assert "1 workload(s) failed to build, 6 peer(s) failed or gave wrong results" in captured.out
    data = json.loads((out / "bench.json").read_text())
    assert data["context"]["quick"] is True and data["settings"]["groups"] == "kernels,train"
    assert data["ceilings"]["copy_GBps"] > 0 and "MEANINGLESS" in data["ceilings"]["label"]
    assert [row["name"] for row in data["rows"]] == ["fake.matmul", "fake.matmul", "fake.broken", "fake.train"]
    assert (out / "speedup_kernels.png").stat().st_size > 0 and (out / "end_to_end.png").stat().st_size > 0
    assert torch.get_num_threads() == threads  # the CPU run's single thread is given back


def test_out_never_overwrites_an_existing_folder(fake_registry, tmp_path, capsys):
    out = tmp_path / "same"
    argv = ["--group", "train"] + CPU + ["--out", str(out)]
    assert main(argv) == 0
    first = (out / "bench.json").read_bytes()
    assert main(argv) == 0 and main(argv) == 0
    assert (out / "bench.json").read_bytes() == first
    assert (tmp_path / "same-2" / "bench.json").exists() and (tmp_path / "same-3" / "summary.md").exists()
    (tmp_path / "empty").mkdir()
    assert unused_folder(tmp_path / "empty") == tmp_path / "empty"  # an empty folder is used as it is


def test_the_default_folder_is_named_after_the_device_and_date(fake_registry, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--group", "train"] + CPU) == 0
    folder = tmp_path / "benchmarks" / "results" / f"cpu_{datetime.date.today().isoformat()}"
    assert (folder / "summary.md").exists()


def test_wrong_fastdit_results_exit_1(monkeypatch, capsys, tmp_path):
    def make(ctx, shape, params):
        x = ctx.randn(4)
        return Workload("kernels", "fake.wrong-fastdit", shape, "n=4",
                        [Peer("fastdit", lambda: (lambda: x + 1)), Peer("eager", lambda: (lambda: x * 1))],
                        reference=lambda: x, check=lambda r, ref: (bool(torch.equal(r, ref)), "exact"))

    monkeypatch.setattr(registry, "all_cases",
                        lambda: [Case("kernels", "fake.wrong-fastdit", {"a": 0}, {"a": 0}, make)])
    assert main(CPU + ["--out", str(tmp_path / "wrong")]) == 1
    assert "fastdit gave wrong results: fake.wrong-fastdit[a] fastdit" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("fastdit.bench.cases_kernels") is None,
                    reason="fastdit/bench/cases_kernels.py (helper F's) does not exist yet")
def test_a_real_quick_kernels_run_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "kernels"
    assert fastdit_main(["bench", "--quick", "--group", "kernels", "--no-progress", "--device", "cpu",
                         "--out", str(out)]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert data["rows"] and all(row["group"] == "kernels" for row in data["rows"])
    assert all(row["status"] == "ok" for row in data["rows"]), [r.get("reason") for r in data["rows"]]
    for row in data["rows"]:
        ours = next(p for p in row["peers"] if p["name"] == "fastdit")
        assert ours["status"] == "ok" and ours["check"] == "passed", (row["name"], row["shape"], ours)
    assert (out / "summary.md").read_text().count("| kernels |") == len(data["rows"])
    assert CPU_WARNING in capsys.readouterr().err


def test_skip_peers_records_the_skip_and_rejects_unknown_names(monkeypatch, capsys, tmp_path):
    ran = []

    def make(ctx, shape, params):
        x = ctx.randn(4)
        return Workload("kernels", "fake.skip", shape, "n=4",
                        [Peer("fastdit", lambda: (lambda: ran.append("fastdit") or x)),
                         Peer("slow-peer", lambda: (lambda: ran.append("slow-peer") or x))],
                        reference=lambda: x, check=lambda r, ref: (bool(torch.equal(r, ref)), "exact"))

    monkeypatch.setattr(registry, "all_cases", lambda: [Case("kernels", "fake.skip", {"a": 0}, {"a": 0}, make,
                                                             peers=("fastdit", "slow-peer"))])
    assert main(CPU + ["--skip-peers", "slow-peer", "--out", str(tmp_path / "skip")]) == 0
    assert "slow-peer" not in ran and "fastdit" in ran
    record = json.loads((tmp_path / "skip" / "bench.json").read_text())
    peers = {p["name"]: p for p in record["rows"][0]["peers"]}
    assert peers["slow-peer"]["status"] == "skipped" and "--skip-peers" in peers["slow-peer"]["reason"]
    assert record["settings"]["skip_peers"] == ["slow-peer"]
    assert main(CPU + ["--skip-peers", "slow-perr", "--out", str(tmp_path / "typo")]) == 2
    assert "--skip-peers: no selected case has a peer named slow-perr (peers: fastdit, slow-peer)" in \
        capsys.readouterr().err
