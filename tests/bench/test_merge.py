"""`fastdit bench --merge`: one report from runs in parts, refused when the parts are not comparable or
overlap; and the partial record a run leaves after each workload (what a run cut by a time limit keeps)."""
import json

import pytest

from fastdit.bench import registry
from fastdit.bench.merge import load_run, merge_runs
from fastdit.cli.bench import PARTIAL_NAME, main

CPU = ["--device", "cpu", "--no-progress"]


@pytest.fixture
def fake_registry(monkeypatch, cases):
    monkeypatch.setattr(registry, "all_cases", lambda: list(cases))
    return cases


@pytest.fixture
def two_parts(fake_registry, tmp_path, capsys):
    assert main(["--group", "kernels"] + CPU + ["--out", str(tmp_path / "a")]) == 0
    assert main(["--group", "train"] + CPU + ["--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    return tmp_path / "a", tmp_path / "b"


def test_merge_writes_one_report_with_every_row_and_each_part(two_parts, tmp_path, capsys):
    a, b = two_parts
    out = tmp_path / "full"
    assert main(["--merge", f"{a / 'bench.json'},{b}", "--out", str(out)]) == 0
    assert "merged 2 runs into" in capsys.readouterr().out
    merged = json.loads((out / "bench.json").read_text())
    rows_a = json.loads((a / "bench.json").read_text())["rows"]
    rows_b = json.loads((b / "bench.json").read_text())["rows"]
    assert merged["rows"] == rows_a + rows_b
    assert [part["workloads"] for part in merged["parts"]] == [len(rows_a), len(rows_b)]
    assert merged["settings"]["merged_from"] == [str(a / "bench.json"), str(b / "bench.json")]
    summary = (out / "summary.md").read_text()
    assert "| part 1 | 3 workloads, groups kernels," in summary and "| part 2 | 1 workloads, groups train," in summary
    assert "## kernels" in summary and "## train" in summary
    assert (out / "speedup_kernels.png").exists() and (out / "end_to_end.png").exists()
    assert not (a / PARTIAL_NAME).exists()  # a finished run leaves no partial file


def test_merge_refuses_overlapping_parts_and_other_setups(two_parts, tmp_path, capsys):
    a, b = two_parts
    assert main(["--merge", f"{a},{a}", "--out", str(tmp_path / "x")]) == 2
    assert "fake.matmul[tiny] is in both" in capsys.readouterr().err
    other = json.loads((b / "bench.json").read_text())
    other["environment"]["git_commit"] = "fedcba"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bench.json").write_text(json.dumps(other))
    assert main(["--merge", f"{a},{tmp_path / 'c'}", "--out", str(tmp_path / "x")]) == 2
    assert "'git_commit' differs" in capsys.readouterr().err
    assert main(["--merge", str(a), "--out", str(tmp_path / "x")]) == 2
    assert "at least two" in capsys.readouterr().err
    assert main(["--merge", f"{a},{b}"]) == 2
    assert "--merge needs --out" in capsys.readouterr().err
    assert main(["--merge", f"{a},{tmp_path / 'nowhere'}", "--out", str(tmp_path / "x")]) == 2
    assert "no such bench.json" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a fastdit bench record"):
        load_run(tmp_path / "junk.json")
    assert not (tmp_path / "x").exists()  # nothing written by a refused merge


def test_a_run_cut_short_leaves_a_partial_record_that_merges(fake_registry, tmp_path, monkeypatch, capsys):
    """The run is killed (here: the report writer raises) after its workloads: bench.partial.json holds every
    finished row with the environment and ceilings, and --merge takes it as a part."""
    import fastdit.bench.report as report

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    original = report.write_report
    monkeypatch.setattr(report, "write_report", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["--group", "kernels"] + CPU + ["--out", str(tmp_path / "cut")])
    monkeypatch.setattr(report, "write_report", original)
    partial = json.loads((tmp_path / "cut" / PARTIAL_NAME).read_text())
    assert partial["complete"] is False and len(partial["rows"]) == 3 and partial["ceilings"]["copy_GBps"] > 0
    assert main(["--group", "train"] + CPU + ["--out", str(tmp_path / "rest")]) == 0
    assert main(["--merge", f"{tmp_path / 'cut'},{tmp_path / 'rest'}", "--out", str(tmp_path / "full")]) == 0
    merged = json.loads((tmp_path / "full" / "bench.json").read_text())
    assert len(merged["rows"]) == 4 and merged["parts"][0]["path"].endswith(PARTIAL_NAME)


def test_merge_runs_keeps_order_and_sums_seconds():
    env = {"device": "cuda", "gpu": "G", "git_commit": "c"}
    run = lambda path, names, seconds: {"_path": path, "environment": env, "context": {"quick": False},  # noqa: E731
                                        "rows": [{"name": n, "shape": "s"} for n in names], "seconds": seconds,
                                        "settings": {"cases": names}}
    merged = merge_runs([run("p", ["x", "y"], 2.0), run("q", ["z"], 3.5)])
    assert [r["name"] for r in merged["rows"]] == ["x", "y", "z"] and merged["seconds"] == 5.5
    assert merged["settings"]["cases"] == ["x", "y", "z"]
    with pytest.raises(ValueError, match="context 'quick' differs"):
        merge_runs([run("p", ["x"], 1), {**run("q", ["z"], 1), "context": {"quick": True}}])
