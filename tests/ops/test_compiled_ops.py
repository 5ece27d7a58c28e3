"""With FASTDIT_TRITON_OP=1 on a GPU the elementwise library ops are triton_ops: Inductor's generated code must
launch fastdit's kernels itself (no Python op call per launch) and give the eager fast path's results, forward
and backward. Not bitwise: Inductor's launch of the same kernel differed from the eager launch by about one
float32 ulp on an H100 (9.5e-7 absolute at magnitudes near 10; Inductor specialises scalar arguments such as
eps); torch's default tolerances for the dtype. Skipped elsewhere (opaque custom ops)."""
import pytest
import torch

from fastdit.ops import adaln_modulate, gated_residual_adaln, qk_norm_rope, rms_norm, rope, rope_freqs_2d
from fastdit.ops._common import traceable_kernels

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and traceable_kernels()),
                                reason="triton_op library ops: FASTDIT_TRITON_OP=1 on a GPU only")

EPS = 1e-6


def _cases():
    B, N, D, H, d = 2, 37, 72, 3, 24  # odd token count; D and d not powers of two

    def dev(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, dtype=dtype, device="cuda")

    freqs = rope_freqs_2d(1, N, d).cuda()
    return {
        "adaln_modulate": (lambda x, s, c: adaln_modulate(x, s, c, EPS),
                           [dev(B, N, D, dtype=torch.float32), dev(B, D), dev(B, D)], ["_adaln_fwd_kernel"],
                           ["_adaln_bwd_kernel", "_sum_chunks_kernel"]),
        "gated_residual_adaln": (lambda x, y, g, s, c: gated_residual_adaln(x, y, g, s, c, EPS),
                                 [dev(B, N, D, dtype=torch.float32), dev(B, N, D), dev(B, D), dev(B, D), dev(B, D)],
                                 ["_adaln_fwd_kernel"], ["_adaln_bwd_kernel", "_sum_chunks_kernel"]),
        "rms_norm": (lambda x, w: rms_norm(x, w, EPS), [dev(B, N, H, d), dev(d, dtype=torch.float32)],
                     ["_qk_norm_rope_fwd_kernel"], ["_qk_norm_rope_bwd_kernel"]),
        "rope": (lambda x: rope(x, freqs), [dev(B, N, H, d)], ["_qk_norm_rope_fwd_kernel"],
                 ["_qk_norm_rope_fwd_kernel"]),
        "qk_norm_rope": (lambda q, k, qw, kw: qk_norm_rope(q, k, qw, kw, freqs, EPS),
                         [dev(B, N, H, d), dev(B, N, H, d), dev(d, dtype=torch.float32),
                          dev(d, dtype=torch.float32)], ["_qk_norm_rope_fwd_kernel"], ["_qk_norm_rope_bwd_kernel"]),
    }


@pytest.mark.parametrize("name", ["adaln_modulate", "gated_residual_adaln", "rms_norm", "rope", "qk_norm_rope"])
def test_compiled_graph_launches_the_kernels_and_matches_eager(name):
    from torch._inductor.utils import run_and_get_code

    fn, inputs, fwd_kernels, bwd_kernels = _cases()[name]
    torch._dynamo.reset()

    cotangents = None

    def step(f, args):
        nonlocal cotangents
        outs = f(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        if cotangents is None:  # the same incoming gradients for both runs
            cotangents = [torch.randn_like(o) for o in outs]
        grads = torch.autograd.grad(outs, args, cotangents)
        return [o.detach() for o in outs], list(grads)

    eager_args = [t.detach().clone().requires_grad_() for t in inputs]
    compiled_args = [t.detach().clone().requires_grad_() for t in inputs]
    expected = step(fn, eager_args)
    compiled = torch.compile(fn, fullgraph=True)
    got, codes = run_and_get_code(lambda: step(compiled, compiled_args))
    code = "\n".join(codes)
    for kernel in fwd_kernels + bwd_kernels:
        assert kernel in code, f"{kernel} is not launched from the compiled code"
    assert "torch.ops.fastdit" not in code, "a fastdit op is still called as an opaque Python op"
    for e, g in zip(expected[0] + expected[1], got[0] + got[1]):
        torch.testing.assert_close(g, e)
