"""fastdit.bench.runner and timing: failures recorded per peer, checks, derived figures, the CPU timers."""
import json
import subprocess

import pytest
import torch

from fastdit.bench import timing
from fastdit.bench.registry import Case, Peer, Workload
from fastdit.bench.runner import is_fastdit, run
from fastdit.bench.timing import (CPU_TIMER, ceilings, environment, gpu_slug, peak_memory, slugify_gpu_name,
                                  time_callable, time_cuda_graph)


def rows_by(run_record):
    return {(row["name"], row["shape"]): row for row in run_record.rows}


def peers_of(row):
    return {peer["name"]: peer for peer in row["peers"]}


def test_every_quick_shape_of_every_case_gives_a_row(fake_run):
    assert list(rows_by(fake_run)) == [("fake.matmul", "tiny"), ("fake.matmul", "small"), ("fake.broken", "tiny"),
                                       ("fake.attention", "seq8"), ("fake.attention", "seq16"), ("fake.train", "b4")]
    assert fake_run.context == {"device": "cpu", "quick": True, "dtype": "float32", "memory_bytes": 2 * 2**30,
                                "seed": 0}
    assert fake_run.settings["graph"] is False and fake_run.settings["groups"] is None
    assert fake_run.seconds > 0


def test_failures_are_recorded_per_peer_and_the_run_goes_on(fake_run):
    row = rows_by(fake_run)[("fake.matmul", "tiny")]
    peers = peers_of(row)
    assert [p["name"] for p in row["peers"]] == ["fastdit", "eager", "wrong", "raises", "oom", "missing-lib"]
    assert peers["raises"]["status"] == "failed" and peers["raises"]["stage"] == "build"
    assert peers["raises"]["reason"] == "RuntimeError: backend exploded while compiling"
    assert peers["oom"]["status"] == "failed" and peers["oom"]["stage"] == "call" and peers["oom"]["out_of_memory"]
    assert peers["oom"]["reason"].startswith("OutOfMemoryError: CUDA out of memory")
    assert peers["missing-lib"] == {"name": "missing-lib", "status": "skipped",
                                    "reason": "missing-lib is not installed"}
    assert "ms" not in peers["raises"] and "ms" not in peers["missing-lib"]
    broken = rows_by(fake_run)[("fake.broken", "tiny")]
    assert broken["status"] == "failed" and broken["reason"] == "ValueError: cannot build shape tiny"
    assert broken["peers"] == [] and broken["fastest_stock"] is None


def test_each_result_is_checked_against_the_reference(fake_run):
    row = rows_by(fake_run)[("fake.matmul", "small")]
    peers = peers_of(row)
    assert row["reference"]["status"] == "ok"
    assert peers["fastdit"]["check"] == "passed" and peers["eager"]["check"] == "passed"
    assert peers["fastdit"]["check_detail"].startswith("max err")
    assert peers["wrong"]["status"] == "ok" and peers["wrong"]["check"] == "failed"  # timed, but marked wrong
    train = rows_by(fake_run)[("fake.train", "b4")]
    assert peers_of(train)["fastdit"]["check"] == "not checked" and train["reference"] == {"status": "none"}


def test_derived_rates_and_speedups(fake_run, fixed_ceilings):
    row = rows_by(fake_run)[("fake.matmul", "small")]
    peers = peers_of(row)
    ours, eager, wrong = peers["fastdit"], peers["eager"], peers["wrong"]
    n = 24
    for peer in (ours, eager, wrong):
        assert peer["p20"] <= peer["ms"] <= peer["p80"] and peer["repeats"] == 3
        assert peer["GBps"] == pytest.approx(3 * n * n * 4 / peer["ms"] / 1e6)
        assert peer["fraction_of_copy"] == pytest.approx(peer["GBps"] / fixed_ceilings["copy_GBps"])
        assert peer["TFLOPs"] == pytest.approx(2 * n ** 3 / peer["ms"] / 1e9)
        assert peer["fraction_of_matmul"] == pytest.approx(peer["TFLOPs"] / fixed_ceilings["bf16_matmul_TFLOPs"])
        assert peer["peak_memory_bytes"] is None  # CPU
    assert row["fastdit_peer"] == "fastdit" and "fastdit_speedup" not in ours
    assert row["fastdit_speedup"] == {"eager": pytest.approx(eager["ms"] / ours["ms"]),
                                      "wrong": pytest.approx(wrong["ms"] / ours["ms"])}
    assert eager["fastdit_speedup"] == row["fastdit_speedup"]["eager"]
    # the fastest stock peer is the fastest one whose result passed: never the wrong one
    assert row["fastest_stock"] == {"peer": "eager", "ms": eager["ms"], "speedup": pytest.approx(eager["ms"] / ours["ms"])}
    train = peers_of(rows_by(fake_run)[("fake.train", "b4")])
    assert train["fastdit"]["items_per_s"] == pytest.approx(4 / (train["fastdit"]["ms"] / 1e3))
    assert "GBps" not in train["fastdit"] and "TFLOPs" not in train["fastdit"]


def test_the_record_is_plain_json(fake_run):
    data = json.loads(json.dumps(fake_run.to_dict(), allow_nan=False))
    assert set(data) == {"environment", "ceilings", "context", "settings", "rows", "seconds"}
    assert data["environment"]["git_commit"] == "0123456789abcdef-test"


def test_a_failed_reference_leaves_the_peers_unchecked_and_a_raising_check_fails(ctx, fixed_ceilings):
    def make(ctx, shape, params):
        x = ctx.randn(3)

        def bad_reference():
            raise ArithmeticError("reference blew up")

        def bad_check(result, reference):
            raise TypeError("cannot compare")
        first = Workload("kernels", "fake.refless", shape, "n=3", [Peer("fastdit", lambda: (lambda: x * 2))],
                         reference=bad_reference, check=lambda r, ref: (True, ""))
        second = Workload("kernels", "fake.refless", shape, "n=3", [Peer("fastdit", lambda: (lambda: x * 2))],
                          reference=lambda: x, check=bad_check)
        return first if shape == "a" else second

    record = run([Case("kernels", "fake.refless", {}, {"a": 0, "b": 0}, make)], ctx, progress=False,
                 ceilings=fixed_ceilings)
    first, second = record.rows
    assert first["reference"] == {"status": "failed", "reason": "ArithmeticError: reference blew up"}
    assert first["peers"][0]["check"] == "not checked" and "reference" in first["peers"][0]["check_detail"]
    assert first["peers"][0]["status"] == "ok" and first["fastest_stock"] is None
    assert second["peers"][0]["check"] == "failed"
    assert second["peers"][0]["check_detail"] == "the check raised TypeError: cannot compare"


def test_the_progress_bar_names_the_current_workload(ctx, cases, fixed_ceilings, capsys):
    run(cases[3:], ctx, progress=True, ceilings=fixed_ceilings)
    err = capsys.readouterr().err
    assert "fake.train[b4]" in err and "2/2" in err


def test_fastdit_peers_are_named_fastdit():
    assert is_fastdit("fastdit") and is_fastdit("fastdit-compile")
    assert not is_fastdit("eager") and not is_fastdit("fastditto")


def test_cpu_timing_is_labelled_meaningless(ctx):
    calls = []
    result = time_callable(lambda: calls.append(1), ctx, quick=True)
    assert len(calls) == 4 and result.repeats == 3 and result.timer == CPU_TIMER and "MEANINGLESS" in CPU_TIMER
    time_callable(lambda: calls.append(1), ctx, quick=True, warm_up=False)
    assert len(calls) == 7
    assert 0 <= result.p20 <= result.ms <= result.p80
    assert time_callable(lambda: None, ctx, quick=False).repeats == 10
    assert peak_memory(lambda: torch.ones(10), ctx) is None
    if not torch.cuda.is_available():
        assert time_cuda_graph(lambda: (lambda: None)) == (None, "CUDA-graph replay needs a CUDA GPU")


def test_cpu_ceilings_are_measured_and_labelled(ctx):
    measured = ceilings(ctx, quick=True)
    assert measured["copy_GBps"] > 0 and measured["bf16_matmul_TFLOPs"] > 0
    assert measured["fp8_matmul_TFLOPs"] is None
    assert measured["skipped"] == {"fp8_matmul_TFLOPs": "fp8 matmul needs a CUDA GPU"}
    assert "MEANINGLESS" in measured["label"]


def test_environment_names_what_ran():
    env = environment("cpu")
    for key in ("gpu", "driver", "cuda", "cudnn", "torch", "triton", "python", "fastdit", "git_commit", "date",
                "time_utc", "timer"):
        assert key in env
    assert env["torch"] == torch.__version__ and env["git_commit"] == "0123456789abcdef-test"
    assert env["gpu"] is None and env["device"] == "cpu"


def test_the_commit_comes_from_the_environment_then_git(monkeypatch):
    monkeypatch.delenv("FASTDIT_GIT_COMMIT")

    def fake_git(args, **kwargs):
        assert args == ["git", "rev-parse", "HEAD"] and kwargs["cwd"].name == "fastdit"
        return subprocess.CompletedProcess(args, 0, stdout="abc123\n", stderr="")

    monkeypatch.setattr(timing.subprocess, "run", fake_git)
    assert timing.git_commit() == "abc123"

    def no_git(args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(timing.subprocess, "run", no_git)
    assert timing.git_commit() is None
    monkeypatch.setattr(timing.subprocess, "run",
                        lambda args, **kw: subprocess.CompletedProcess(args, 128, stdout="", stderr="not a repo"))
    assert timing.git_commit() is None


def test_gpu_slugs():
    assert gpu_slug("cpu") == "cpu"
    assert slugify_gpu_name("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert slugify_gpu_name("NVIDIA A100-SXM4-80GB") == "a100-sxm4-80gb"
    assert slugify_gpu_name("NVIDIA GeForce RTX 4090") == "geforce-rtx-4090"
