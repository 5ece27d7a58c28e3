"""joint_attention: reference vs SDPA on the concatenation in float64, mask semantics, layouts, op."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from fastdit.ops import joint_attention, joint_attention_ref, joint_attention_sdpa
from fastdit.testing import assert_close_to_reference


def make(B, N_img, N_txt, H, d, dtype=torch.float64, requires_grad=False, device="cpu"):
    img = [torch.randn(B, N_img, H, d).to(device, dtype) for _ in range(3)]
    txt = [torch.randn(B, N_txt, H, d).to(device, dtype) for _ in range(3)] if N_txt is not None else [None] * 3
    return [t.requires_grad_(requires_grad) if t is not None else None for t in img + txt]


def random_lengths(B, N_txt):
    lengths = torch.randint(0, N_txt + 1, (B,))
    lengths[0] = 0  # always one sample without any real caption token
    return lengths


def independent(q_img, k_img, v_img, q_txt, k_txt, v_txt, lengths):
    """float64 SDPA over [text, image] with a boolean key mask."""
    B, N_img = q_img.shape[:2]
    cat = (lambda a, b: torch.cat([b, a], 1)) if q_txt is not None else (lambda a, b: a)
    q, k, v = (cat(a, b).double().transpose(1, 2) for a, b in ((q_img, q_txt), (k_img, k_txt), (v_img, v_txt)))
    mask = None
    if lengths is not None:
        N_txt = q_txt.shape[1]
        keep = torch.cat([torch.arange(N_txt) < lengths[:, None], torch.ones(B, N_img, dtype=torch.bool)], 1)
        mask = keep[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    N_txt = 0 if q_txt is None else q_txt.shape[1]
    return out[:, N_txt:], (out[:, :N_txt] if q_txt is not None else None)


@pytest.mark.parametrize("N_img,N_txt,d", [(1, 1, 72), (7, None, 72), (113, 77, 8), (7, 0, 64), (1, 77, 16)])
def test_reference_matches_sdpa_on_the_concatenation(N_img, N_txt, d):
    inputs = make(2, N_img, N_txt, 2, d)
    lengths = random_lengths(2, N_txt) if N_txt else None
    got = joint_attention_ref(*inputs, txt_mask=lengths)
    want = independent(*inputs, lengths)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    if N_txt is None:
        assert got[1] is None
    else:
        if lengths is not None:  # padded caption queries: zero outputs by definition (SDPA computes rows there)
            real = torch.arange(want[1].shape[1])[None, :] < lengths[:, None]
            want = (want[0], want[1].masked_fill(~real[:, :, None, None], 0))
        torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-10)


def test_padded_caption_keys_get_zero_weight():
    inputs = make(3, 7, 9, 2, 16)
    lengths = torch.tensor([0, 4, 9])
    out_img, out_txt = joint_attention_ref(*inputs, txt_mask=lengths)
    # Scramble every padded caption key and value: no real output may change.
    scrambled = [t.clone() for t in inputs]
    for b, n in enumerate(lengths.tolist()):
        scrambled[4][b, n:] = 1e3 * torch.randn_like(scrambled[4][b, n:])
        scrambled[5][b, n:] = 1e3 * torch.randn_like(scrambled[5][b, n:])
    out_img2, out_txt2 = joint_attention_ref(*scrambled, txt_mask=lengths)
    torch.testing.assert_close(out_img, out_img2, rtol=0, atol=0)
    torch.testing.assert_close(out_txt, out_txt2, rtol=0, atol=0)


def test_a_sample_without_caption_tokens_is_image_self_attention():
    inputs = make(2, 7, 5, 2, 16)
    out_img, out_txt = joint_attention_ref(*inputs, txt_mask=torch.tensor([0, 5]))
    self_only, _ = joint_attention_ref(*(t[:1] for t in inputs[:3]))
    torch.testing.assert_close(out_img[:1], self_only)
    assert torch.isfinite(out_txt).all()  # padded queries still give finite outputs


def test_bool_mask_equals_lengths_and_allows_holes():
    inputs = make(2, 5, 6, 1, 8)
    lengths = torch.tensor([2, 6])
    as_bool = torch.arange(6) < lengths[:, None]
    a, b = joint_attention_ref(*inputs, txt_mask=lengths), joint_attention_ref(*inputs, txt_mask=as_bool)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    holes = torch.tensor([[True, False, True, False, False, True]] * 2)  # not a prefix: still honoured
    scrambled = [t.clone() for t in inputs]
    scrambled[4][:, 1] += 5.0
    torch.testing.assert_close(joint_attention_ref(*inputs, txt_mask=holes)[0],
                               joint_attention_ref(*scrambled, txt_mask=holes)[0])


def test_text_stream_order_and_symmetry():
    """Joint attention is symmetric: swapping which stream is called 'image' swaps the outputs."""
    q_i, k_i, v_i, q_t, k_t, v_t = make(2, 5, 3, 2, 8)
    o_img, o_txt = joint_attention_ref(q_i, k_i, v_i, q_t, k_t, v_t)
    s_img, s_txt = joint_attention_ref(q_t, k_t, v_t, q_i, k_i, v_i)
    torch.testing.assert_close(o_img, s_txt)
    torch.testing.assert_close(o_txt, s_img)


def test_layout_bhnd_equals_bnhd():
    inputs = make(2, 7, 4, 3, 8)
    lengths = torch.tensor([1, 4])
    want = joint_attention_ref(*inputs, txt_mask=lengths)
    for fn in (joint_attention_ref, joint_attention_sdpa, joint_attention):
        got = fn(*(t.transpose(1, 2) for t in inputs), txt_mask=lengths, layout="bhnd")
        assert got[0].shape == (2, 3, 7, 8)
        torch.testing.assert_close(got[0].transpose(1, 2), want[0])
        torch.testing.assert_close(got[1].transpose(1, 2), want[1])


def test_custom_scale():
    inputs = make(1, 6, 2, 2, 8)
    got = joint_attention_ref(*inputs, scale=0.05)
    rescaled = [inputs[0] * 0.05 * math.sqrt(8)] + inputs[1:3] + [inputs[3] * 0.05 * math.sqrt(8)] + inputs[4:]
    want = joint_attention_ref(*rescaled)
    torch.testing.assert_close(got[0], want[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_backends_follow_the_2x_rule_forward_and_backward(dtype, backend, device):
    inputs = make(2, 7, 5, 2, 64, dtype, requires_grad=True, device=device)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    lengths = torch.tensor([0, 3], device=device)
    outs = joint_attention(*inputs, txt_mask=lengths, backend=backend)
    refs = joint_attention_ref(*inputs, txt_mask=lengths)
    refs64 = joint_attention_ref(*inputs64, txt_mask=lengths)
    for o, r, r64, name in zip(outs, refs, refs64, ("out_img", "out_txt")):
        assert o.dtype == dtype
        assert_close_to_reference(o, r, r64, name=name)
    cot = [torch.randn(o.shape).to(device, dtype) for o in outs]
    grads = torch.autograd.grad(outs, inputs, cot)
    grads_ref = torch.autograd.grad(refs, inputs, cot)
    grads64 = torch.autograd.grad(refs64, inputs64, [c.double() for c in cot])
    names = ("dq_img", "dk_img", "dv_img", "dq_txt", "dk_txt", "dv_txt")
    for g, gr, g64, name in zip(grads, grads_ref, grads64, names):
        # padded caption keys/values must receive exactly zero gradient
        assert_close_to_reference(g, gr, g64, name=name)
    assert grads[4][0].abs().max() == 0 and grads[5][0].abs().max() == 0 and grads[4][1, 3:].abs().max() == 0


@pytest.mark.parametrize("with_text", [True, False])
@pytest.mark.parametrize("impl", ["reference", "library_op"])
def test_gradcheck_every_input(with_text, impl):
    inputs = make(2, 3, 2 if with_text else None, 2, 4, requires_grad=True)
    lengths = torch.tensor([0, 2]) if with_text else None
    if impl == "reference":
        def fn(*args):
            return tuple(o for o in joint_attention_ref(*args, txt_mask=lengths) if o is not None)
    else:
        mask = None if lengths is None else torch.arange(2) < lengths[:, None]

        def fn(*args):
            if not with_text:
                empty = args[0].new_zeros(2, 0, 2, 4)
                args = (*args[:3], empty, empty, empty)
            return tuple(torch.ops.fastdit.joint_attention(*args, mask, 0.5)[:2])
    assert torch.autograd.gradcheck(fn, tuple(t for t in inputs if t is not None))


@pytest.mark.parametrize("with_mask", [True, False])
def test_opcheck(with_mask):
    qkv_img = torch.randn(2, 5, 3, 2, 16, dtype=torch.bfloat16)
    img = [t.requires_grad_() for t in qkv_img.unbind(2)]  # strided (B, N, H, d) views, as from a projection
    txt = [torch.randn(2, 3, 2, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    mask = torch.tensor([[True, False, False], [False, False, False]]) if with_mask else None
    opcheck(torch.ops.fastdit.joint_attention.default, (*img, *txt, mask, 0.25))
    empty = [torch.empty(2, 0, 2, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    opcheck(torch.ops.fastdit.joint_attention.default, (*img, *empty, None, 0.25))


def test_bad_inputs_raise_clear_errors():
    q, k, v, qt, kt, vt = make(2, 5, 3, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="give all of q_txt, k_txt, v_txt, or none"):
        joint_attention(q, k, v, qt, kt)
    with pytest.raises(ValueError, match="k_img must match q_img's shape"):
        joint_attention(q, k[:, :4], v)
    with pytest.raises(ValueError, match=r"k_txt must be \(B, N_txt, H, d\) = \(2, 3, 2, 8\)"):
        joint_attention(q, k, v, qt, kt[..., :4], vt)
    with pytest.raises(ValueError, match="txt_mask was given without a text stream"):
        joint_attention(q, k, v, txt_mask=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"caption lengths must lie in \[0, 3\]"):
        joint_attention(q, k, v, qt, kt, vt, txt_mask=torch.tensor([1, 4]))
    with pytest.raises(ValueError, match=r"bool txt_mask must be \(B, N_txt\) = \(2, 3\)"):
        joint_attention(q, k, v, qt, kt, vt, txt_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="has dtype torch.float16 but q_img has torch.float32"):
        joint_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="layout must be"):
        joint_attention(q, k, v, layout="nbhd")
    with pytest.raises(ValueError, match=r"head dim 8 is not supported by the attention kernel \(supported: 64, 72"):
        joint_attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match=r"dtype torch.float64; .*head dim 8"):  # every reason is named
        joint_attention(q.double(), k.double(), v.double(), backend="triton")
