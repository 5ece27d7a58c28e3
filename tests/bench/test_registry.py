"""fastdit.bench.registry: the context, case registration, case-module import rules, selection errors."""
import sys

import pytest
import torch

from fastdit.bench import registry
from fastdit.bench.registry import GROUPS, Case, Context, Peer, all_cases, register, select


def test_the_cpu_context_is_quick_fp32_with_two_gib():
    ctx = Context.create("cpu")
    assert ctx.device == torch.device("cpu") and ctx.quick and ctx.dtype == torch.float32
    assert ctx.memory_bytes == 2 * 2**30
    assert ctx.describe() == {"device": "cpu", "quick": True, "dtype": "float32", "memory_bytes": 2 * 2**30,
                              "seed": 0}


def test_context_random_data_is_seeded_private_and_successive():
    state = torch.get_rng_state()
    a, b = Context.create("cpu", seed=3), Context.create("cpu", seed=3)
    first, second = a.randn(4, 5), a.randn(4, 5)
    assert torch.equal(first, b.randn(4, 5)) and not torch.equal(first, second)
    assert a.randn((2, 3), dtype=torch.float64, requires_grad=True).requires_grad
    assert torch.equal(a.generator().get_state(), b.generator().get_state())
    assert torch.equal(torch.get_rng_state(), state)  # the global generator was never touched


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_cuda_context_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        Context.create("cuda")


def test_a_peer_needs_a_build_function_or_a_skip_reason():
    with pytest.raises(ValueError, match="no build function and no skip reason"):
        Peer("eager", None)
    assert Peer("xformers", None, skip="not installed").skip == "not installed"


def test_shapes_for_picks_the_quick_shapes_in_a_quick_context(cases):
    matmul = cases[0]
    assert list(matmul.shapes_for(Context.create("cpu"))) == ["tiny", "small"]
    full = Context(device=torch.device("cpu"), quick=False, dtype=torch.float32, memory_bytes=1)
    assert list(matmul.shapes_for(full)) == ["big"]
    assert matmul.shape_names == ["big", "tiny", "small"]


def test_register_checks_the_group_and_unique_names(monkeypatch, cases):
    monkeypatch.setattr(registry, "_CASES", [])
    assert register(cases[0]) is cases[0]
    with pytest.raises(ValueError, match="registered already"):
        register(cases[0])
    with pytest.raises(ValueError, match="unknown group 'nope'.*kernels, attention"):
        register(Case("nope", "x", {}, {}, make=lambda *a: None))


def test_all_cases_skips_missing_case_modules_and_orders_by_group(monkeypatch, cases):
    monkeypatch.setattr(registry, "_CASES", [])
    monkeypatch.setattr(registry, "CASE_MODULES", ("fastdit.bench.cases_that_do_not_exist",))
    for case in reversed(cases):  # registered train first, kernels last
        register(case)
    assert [c.group for c in all_cases()] == ["kernels", "kernels", "attention", "train"]


def test_all_cases_raises_an_import_error_inside_an_existing_case_module(monkeypatch, tmp_path):
    (tmp_path / "bench_cases_broken_for_test.py").write_text("import a_module_nobody_has_installed_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_CASES", [])
    monkeypatch.setattr(registry, "CASE_MODULES", ("bench_cases_broken_for_test",))
    with pytest.raises(ModuleNotFoundError, match="a_module_nobody_has_installed_xyz"):
        all_cases()
    sys.modules.pop("bench_cases_broken_for_test", None)


def test_the_real_registry_imports():
    cases = all_cases()  # whatever case modules exist import cleanly and register valid groups
    assert all(case.group in GROUPS for case in cases)
    assert len({case.name for case in cases}) == len(cases)


def test_select_by_group_and_shape(cases):
    assert [c.name for c in select(cases, groups="attention,train")] == ["fake.attention", "fake.train"]
    assert [c.name for c in select(cases, groups=["kernels"])] == ["fake.matmul", "fake.broken"]
    assert select(cases) == cases and select(cases, groups="", shapes=" ") == cases
    picked = select(cases, shapes="small,seq16")
    assert [c.name for c in picked] == ["fake.matmul", "fake.attention"]
    assert picked[0].quick_shapes == {"small": 24} and picked[0].shapes == {}
    assert picked[1].quick_shapes == {"seq16": 16}
    assert cases[0].quick_shapes == {"tiny": 16, "small": 24}  # the originals are untouched


def test_select_names_the_valid_groups_and_shapes(cases):
    with pytest.raises(ValueError, match=r"unknown group kernel; valid groups: kernels, attention, modules, train, "
                                         r"sample, diffusers"):
        select(cases, groups="kernel")
    with pytest.raises(ValueError, match=r"unknown shapes seq9, huge; valid shapes of group attention: "
                                         r"seq1024, seq8, seq16"):
        select(cases, groups="attention", shapes="seq9,huge")
    with pytest.raises(ValueError, match=r"valid shapes: big, tiny, small, seq1024, seq8, seq16, b64, b4"):
        select(cases, shapes="nope")
