"""Exact resume after SIGKILL and the non-finite guard, with real worker processes (gloo on CPU).

Workers get torchrun's environment variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) from the test, each
in its own session, so the test can SIGKILL every rank at once. The per-step loss (mean over ranks) that
rank 0 writes to metrics.jsonl must match an uninterrupted run's bitwise, and so must the final model,
EMA and optimizer states.
"""
import os
import random
import re
import time

import pytest
import torch

from fastdit.training import load_state

TIMEOUT = 150


def _run(toy, tmp_path, world, args, name):
    procs = toy.launch(world, [tmp_path / name, *args], tmp_path)
    codes = toy.wait_all(procs, TIMEOUT)
    assert codes == [0] * world, toy.worker_logs(tmp_path)
    return tmp_path / name


def _kill_at_step(toy, tmp_path, world, args, name, kill_step):
    """Start a run and SIGKILL all its ranks once rank 0 has logged ``kill_step``."""
    run_dir = tmp_path / name
    procs = toy.launch(world, [run_dir, *args], tmp_path)
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            if os.path.exists(run_dir / "metrics.jsonl"):
                records, _ = toy.step_records(run_dir)
                if records and max(records) >= kill_step:
                    break
            assert all(p.poll() is None for p in procs), "a worker ended early:\n" + toy.worker_logs(tmp_path)
            time.sleep(0.005)
        else:
            raise AssertionError("the run never reached the kill step:\n" + toy.worker_logs(tmp_path))
    finally:
        toy.kill_all(procs)
    assert all(p.returncode == -9 for p in procs)
    return run_dir


def _assert_same_run(toy, ref_dir, run_dir, steps):
    ref, _ = toy.step_records(ref_dir)
    got, repeats = toy.step_records(run_dir)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert got[step]["loss"] == ref[step]["loss"], f"step {step}: {got[step]['loss']} != {ref[step]['loss']}"
        assert got[step]["grad_norm"] == ref[step]["grad_norm"]
        assert got[step]["lr"] == ref[step]["lr"]
    for first, again in repeats:  # steps run before the kill and again after the resume
        assert first["loss"] == again["loss"]
    a = load_state(str(ref_dir / "checkpoints" / f"step_{steps:09d}"))
    b = load_state(str(run_dir / "checkpoints" / f"step_{steps:09d}"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][key], b["ema"]["shadow"][key]), key
    for fqn, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][fqn][k]), (fqn, k)
    assert a["data"] == b["data"]
    for ra, rb in zip(a["rng"], b["rng"]):
        assert torch.equal(ra["torch"], rb["torch"]) and ra["python"] == rb["python"]


def test_ddp_over_duplicated_streams_is_bitwise_one_process(toy, tmp_path):
    """Two ranks that draw the same data and random numbers average two equal gradients, which is exact
    in floating point: every step's loss and grad norm, and the final weights, must equal one process's
    bitwise. Checks that DDP (bucketing, averaging, the agreed non-finite check) adds nothing to the math."""
    one = _run(toy, tmp_path, 1, ["--steps", 8, "--every", 8, "--data", "synthetic"], "one")
    two = _run(toy, tmp_path, 2, ["--steps", 8, "--every", 8, "--data", "synthetic", "--same-stream"], "two")
    ref, _ = toy.step_records(one)
    got, _ = toy.step_records(two)
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    for step in ref:
        assert (got[step]["loss"], got[step]["grad_norm"]) == (ref[step]["loss"], ref[step]["grad_norm"]), step
    a, b = (load_state(str(d / "checkpoints" / "step_000000008")) for d in (one, two))
    assert b["world_size"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.fixture(scope="module")
def reference_2ranks(toy, tmp_path_factory):
    """One uninterrupted 2-rank run shared by the resume tests."""
    return _run(toy, tmp_path_factory.mktemp("ref2"), 2, ["--steps", 16, "--every", 4], "ref")


def test_sigkill_at_a_random_step_then_resume_is_bitwise_exact_2_ranks(toy, tmp_path, reference_2ranks):
    kill_step = random.randint(5, 13)  # seeded per test by tests/conftest.py
    args = ["--steps", 16, "--every", 4]
    # 0.15 s a step: the kill must land before step 16 even when this poll loop is starved on a loaded
    # 2-core machine (one failure seen there with 0.05 s; the delay draws no random numbers)
    run_dir = _kill_at_step(toy, tmp_path, 2, [*args, "--delay", 0.15], "run", kill_step)
    records, _ = toy.step_records(run_dir)
    assert max(records) < 16, "the run finished before it was killed"
    _run(toy, tmp_path, 2, args, "run")
    _assert_same_run(toy, reference_2ranks, run_dir, 16)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["rename", "pointer"])
def test_sigkill_during_a_save_then_resume_is_bitwise_exact_2_ranks(toy, tmp_path, reference_2ranks, point):
    """Rank 0 dies inside the save of checkpoint 8: files written but the folder not renamed, or the
    folder renamed but `latest` not moved. The resume picks a complete checkpoint and ends identical."""
    args = ["--steps", 16, "--every", 4]
    procs = toy.launch(2, [tmp_path / "run", *args, "--kill-in-save", f"8:{point}"], tmp_path)
    try:
        procs[0].wait(TIMEOUT)
    finally:
        toy.kill_all(procs)
    assert procs[0].returncode == -9
    names = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    if point == "rename":  # the half-written checkpoint is only a temporary folder; latest is step 4
        assert any(n.startswith(".tmp-step_000000008") for n in names) and "step_000000008" not in names
        assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000000004"
    else:
        assert "step_000000008" in names
    _run(toy, tmp_path, 2, args, "run")
    assert not any(n.startswith(".tmp-") for n in os.listdir(tmp_path / "run" / "checkpoints"))
    _assert_same_run(toy, reference_2ranks, tmp_path / "run", 16)


def test_sigkill_then_resume_is_bitwise_exact_single_process(toy, tmp_path):
    args = ["--steps", 12, "--every", 3, "--data", "synthetic"]
    ref = _run(toy, tmp_path, 1, args, "ref")
    run_dir = _kill_at_step(toy, tmp_path, 1, [*args, "--delay", 0.05], "run", random.randint(4, 10))
    _run(toy, tmp_path, 1, args, "run")
    _assert_same_run(toy, ref, run_dir, 12)


def test_nan_on_one_rank_is_skipped_by_all_ranks_together(toy, tmp_path):
    """Rank 1 alone returns a NaN loss at step 3: both ranks skip that update (nobody hangs), the
    model, EMA and optimizer state after step 3 equal those after step 2, and training goes on."""
    run_dir = _run(toy, tmp_path, 2, ["--steps", 5, "--every", 1, "--nan", "1:3"], "run")
    digests = re.findall(r"rank \d done: .* weights ([0-9a-f]+)", toy.worker_logs(tmp_path))
    assert len(digests) == 2 and digests[0] == digests[1], "the ranks' weights diverged"
    records, _ = toy.step_records(run_dir)
    assert records[3]["skipped"] == 1 and records[3]["loss"] is None and records[3]["grad_norm"] is None
    assert [records[s]["skipped"] for s in (1, 2, 4, 5)] == [0, 0, 0, 0]
    assert records[5]["skipped_steps"] == 1
    ckpt = run_dir / "checkpoints"
    # keep_last=3: steps 3, 4, 5 remain; step 2 is gone, so compare 3 with a recomputation-free fact:
    s3, s4 = load_state(str(ckpt / "step_000000003")), load_state(str(ckpt / "step_000000004"))
    assert s3["skipped_steps"] == 1 and s4["skipped_steps"] == 1
    assert s3["optimizer"]["state"]["out.weight"]["step"].item() == 2  # two updates, step 3 not one
    assert s4["optimizer"]["state"]["out.weight"]["step"].item() == 3
    assert s3["ema"]["num_updates"] == 2 and s4["ema"]["num_updates"] == 3
    assert all(torch.isfinite(v).all() for v in s4["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_nan_on_one_rank_with_error_policy_stops_every_rank(toy, tmp_path):
    procs = toy.launch(2, [tmp_path / "run", "--steps", 6, "--nan", "1:2", "--nonfinite", "error"], tmp_path)
    codes = toy.wait_all(procs, TIMEOUT)
    logs = toy.worker_logs(tmp_path)
    assert codes == [1, 1], logs
    # only rank 1 saw the NaN (its gradients were finite), yet both ranks stop at the same step
    assert logs.count("NonFiniteError: step 2: non-finite loss or gradient norm on rank(s) [1] "
                      "(run.nonfinite=error)") == 2, logs


@pytest.mark.slow
def test_fsdp2_resume_is_exact_and_its_checkpoints_load_under_ddp(toy, tmp_path):
    """FSDP2 (fully_shard per block, then the root) on 2 gloo ranks: stopping at step 4 and resuming
    gives the uninterrupted run's losses bitwise; the (unsharded) checkpoint then continues under DDP."""
    fsdp = ["--every", 4, "--parallel", "fsdp"]
    ref = _run(toy, tmp_path, 2, ["--steps", 8, *fsdp], "ref")
    _run(toy, tmp_path, 2, ["--steps", 4, *fsdp], "run")
    run_dir = _run(toy, tmp_path, 2, ["--steps", 8, *fsdp], "run")
    _assert_same_run(toy, ref, run_dir, 8)
    _run(toy, tmp_path, 2, ["--steps", 10, "--every", 4, "--parallel", "ddp"], "run")
    records, _ = toy.step_records(run_dir)
    assert sorted(records) == list(range(1, 11)) and all(records[s]["loss"] is not None for s in records)


def test_sigkill_then_resume_is_bitwise_exact_on_streamed_latent_shards_2_ranks_x_2_workers(toy, tmp_path):
    """Streamed data (latent shards read by 2 DataLoader workers per rank, 5 shards of unequal size over
    4 slots) keeps the resume exact: the data position of every worker slot is in the checkpoint."""
    shards = tmp_path / "shards"
    toy.write_latent_shards(shards, toy.toy_config(tmp_path / "unused"))
    args = ["--steps", 10, "--every", 3, "--data", f"latents:{shards}:2"]
    ref = _run(toy, tmp_path, 2, args, "ref")
    run_dir = _kill_at_step(toy, tmp_path, 2, [*args, "--delay", 0.15], "run", random.randint(4, 8))
    _run(toy, tmp_path, 2, args, "run")
    _assert_same_run(toy, ref, run_dir, 10)
    state = load_state(str(run_dir / "checkpoints" / "step_000000009"))["data"]
    assert len(state) == 2 and all(len(s["slots"]) == 2 for s in state)


def test_skipped_samples_are_counted_over_every_rank_up_to_the_last_batch_trained(toy, tmp_path):
    """Every fifth sample of each shard is bad. metrics.jsonl's data_skips must equal the skips the two ranks'
    datasets meet while drawing exactly the batches trained on (replayed here), not rank 0's alone and not
    what the prefetcher drew ahead."""
    from fastdit.data.streaming import skip_counts_of_state

    shards = tmp_path / "shards"
    cfg = toy.toy_config(tmp_path / "unused")
    toy.write_latent_shards(shards, cfg)
    steps = 9
    run_dir = _run(toy, tmp_path, 2, ["--steps", steps, "--every", 100, "--data", f"latents-with-bad:{shards}:2"],
                   "run")
    records, _ = toy.step_records(run_dir)
    for step in (1, 5, steps):
        expected = 0
        for rank in range(2):
            dataset = toy.toy_dataset(cfg, rank, 2, kind=f"latents-with-bad:{shards}:2")  # as the run reads
            batches = iter(dataset)
            for _ in range(step):
                next(batches)
            expected += skip_counts_of_state(dataset.state_dict()).get("toy bad sample", 0)
            del batches
        assert records[step]["data_skips"] == ({"toy bad sample": expected} if expected else {}), step
    assert records[steps]["data_skips"]["toy bad sample"] > 0
