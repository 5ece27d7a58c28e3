"""Fake bench cases for the tests of fastdit.bench: small, fast, and each one exercising one path of the
runner (a good peer, a wrong peer, a peer whose build raises, one that runs out of memory, a skipped
one, a workload that cannot be built, attention at seq<N> shapes, a training step with items)."""
import pytest
import torch

from fastdit.bench.registry import Case, Context, Peer, Workload

CEILINGS = {"copy_GBps": 10.0, "bf16_matmul_TFLOPs": 0.5, "fp8_matmul_TFLOPs": None,
            "skipped": {"fp8_matmul_TFLOPs": "fp8 matmul needs a CUDA GPU"}, "label": "fixed for the tests"}


@pytest.fixture(autouse=True)
def _no_git(monkeypatch):
    """The environment record takes the commit from FASTDIT_GIT_COMMIT: the tests never run git."""
    monkeypatch.setenv("FASTDIT_GIT_COMMIT", "0123456789abcdef-test")


def matmul_check(result, reference):
    error = (result.double() - reference).abs().max().item()
    bound = 1e-4 * reference.abs().max().item()
    return error <= bound, f"max err {error:.2e} vs bound {bound:.2e}"


def make_matmul(ctx: Context, shape: str, n: int) -> Workload:
    a, b = ctx.randn(n, n), ctx.randn(n, n)

    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    def no_backend():
        raise RuntimeError("backend exploded while compiling")

    return Workload(
        group="kernels", name="fake.matmul", shape=shape, dims=f"n={n}",
        peers=[Peer("fastdit", lambda: (lambda: a @ b)),
               Peer("eager", lambda: (lambda: torch.matmul(a, b))),
               Peer("wrong", lambda: (lambda: a @ b + 1.0)),
               Peer("raises", no_backend),
               Peer("oom", lambda: out_of_memory),
               Peer("missing-lib", None, skip="missing-lib is not installed")],
        bytes=3.0 * n * n * 4, flops=2.0 * n ** 3,
        reference=lambda: a.double() @ b.double(), check=matmul_check)


def make_broken(ctx, shape, params):
    raise ValueError(f"cannot build shape {shape}")


def make_attention(ctx: Context, shape: str, n: int) -> Workload:
    q, k, v = (ctx.randn(1, 2, n, 8) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def check(result, reference):
        error = (result.double() - reference).abs().max().item()
        return error < 1e-4, f"max err {error:.2e}"

    def by_hand():
        weights = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)
        return weights @ v

    return Workload(group="attention", name="fake.attention", shape=shape, dims=f"B=1 H=2 N={n} d=8",
                    peers=[Peer("fastdit", lambda: (lambda: sdpa(q, k, v))), Peer("sdpa-math", lambda: by_hand)],
                    flops=4.0 * 2 * n * n * 8, reference=lambda: sdpa(q.double(), k.double(), v.double()),
                    check=check)


def make_train(ctx: Context, shape: str, batch: int) -> Workload:
    def build():
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 8)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = ctx.randn(batch, 8)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = model(x).square().mean()
            loss.backward()
            optimizer.step()
        return step

    return Workload(group="train", name="fake.train", shape=shape, dims=f"batch {batch}",
                    peers=[Peer("fastdit", build), Peer("eager", build)], items=float(batch), item_unit="img")


def fake_cases():
    return [
        Case("kernels", "fake.matmul", shapes={"big": 256}, quick_shapes={"tiny": 16, "small": 24},
             make=make_matmul, peers=("fastdit", "eager", "wrong", "raises", "oom", "missing-lib")),
        Case("kernels", "fake.broken", shapes={"big": 1}, quick_shapes={"tiny": 1}, make=make_broken),
        Case("attention", "fake.attention", shapes={"seq1024": 1024}, quick_shapes={"seq8": 8, "seq16": 16},
             make=make_attention),
        Case("train", "fake.train", shapes={"b64": 64}, quick_shapes={"b4": 4}, make=make_train),
    ]


@pytest.fixture
def cases():
    return fake_cases()


@pytest.fixture
def ctx():
    return Context.create("cpu")


@pytest.fixture(scope="session")
def fake_run():
    """One run of every fake case on the CPU (fixed ceilings), shared by the runner and report tests."""
    from fastdit.bench.runner import run

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTDIT_GIT_COMMIT", "0123456789abcdef-test")
        return run(fake_cases(), Context.create("cpu"), progress=False, ceilings=dict(CEILINGS),
                   settings={"groups": None})


@pytest.fixture
def fixed_ceilings():
    return dict(CEILINGS)
