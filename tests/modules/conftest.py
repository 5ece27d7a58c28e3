"""Stock PyTorch blocks written from the papers (DiT; SD3/Flux MMDiT), with the state-dict keys that
fastdit's modules promise to keep: the modules must load their weights strictly and compute the same."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class StockMlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class StockAttention(nn.Module):
    """timm's Attention as DiT uses it (qkv -> (3, heads, head_dim) -> SDPA -> proj)."""

    def __init__(self, d, heads, qk_norm=False):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        if qk_norm:
            self.q_norm, self.k_norm = nn.RMSNorm(d // heads, eps=1e-6), nn.RMSNorm(d // heads, eps=1e-6)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class StockDiTBlock(nn.Module):
    """The official DiT block (Peebles & Xie, facebookresearch/DiT models.py), written out."""

    def __init__(self, d, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = StockAttention(d, heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = StockMlp(d, int(d * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


def rotate_complex(x, freqs):
    """(B, H, N, d) rotated by a (N, d/2, 2) table, channel pairs interleaved, via complex numbers."""
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(z * torch.view_as_complex(freqs.to(x.dtype).contiguous())).flatten(-2)


class StockJointAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.qkv, self.proj, self.txt_qkv, self.txt_proj = (nn.Linear(d, 3 * d), nn.Linear(d, d),
                                                            nn.Linear(d, 3 * d), nn.Linear(d, d))
        self.q_norm, self.k_norm, self.txt_q_norm, self.txt_k_norm = (nn.RMSNorm(self.hd, eps=1e-6) for _ in range(4))

    def _heads(self, x, qkv, qn, kn, freqs):
        B, N, _ = x.shape
        q, k, v = qkv(x).reshape(B, N, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = qn(q), kn(k)
        if freqs is not None:
            q, k = rotate_complex(q, freqs), rotate_complex(k, freqs)
        return q, k, v

    def forward(self, x, ctx, lengths, img_freqs, txt_freqs):
        qi, ki, vi = self._heads(x, self.qkv, self.q_norm, self.k_norm, img_freqs)
        qt, kt, vt = self._heads(ctx, self.txt_qkv, self.txt_q_norm, self.txt_k_norm, txt_freqs)
        q, k, v = (torch.cat(p, dim=2) for p in ((qt, qi), (kt, ki), (vt, vi)))  # [text, image], as SD3/Flux
        B, Nt, Ni = x.shape[0], ctx.shape[1], x.shape[1]
        mask = None
        if lengths is not None:
            keep = torch.cat([torch.arange(Nt, device=x.device) < lengths[:, None],
                              torch.ones(B, Ni, dtype=torch.bool, device=x.device)], 1)
            mask = keep[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        return self.proj(out[:, Nt:]), self.txt_proj(out[:, :Nt])


class StockJointBlock(nn.Module):
    """A plain SD3/Flux-style double-stream block with fastdit's JointDiTBlock keys."""

    def __init__(self, d, heads, mlp_ratio=4.0):
        super().__init__()
        self.attn = StockJointAttention(d, heads)
        self.mlp, self.txt_mlp = StockMlp(d, int(d * mlp_ratio)), StockMlp(d, int(d * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.txt_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, ctx, c, lengths=None, img_freqs=None, txt_freqs=None):
        m = self.adaLN_modulation(c).chunk(6, 1)
        t = self.txt_adaLN_modulation(c).chunk(6, 1)
        ln = lambda z: F.layer_norm(z, z.shape[-1:], eps=1e-6)  # noqa: E731
        a, ac = self.attn(modulate(ln(x), m[0], m[1]), modulate(ln(ctx), t[0], t[1]), lengths, img_freqs, txt_freqs)
        x = x + m[2].unsqueeze(1) * a
        ctx = ctx + t[2].unsqueeze(1) * ac
        x = x + m[5].unsqueeze(1) * self.mlp(modulate(ln(x), m[3], m[4]))
        ctx = ctx + t[5].unsqueeze(1) * self.txt_mlp(modulate(ln(ctx), t[3], t[4]))
        return x, ctx


class OpRecorder(TorchDispatchMode):
    """Records the names of the aten/custom ops that run, and the storages of their tensor inputs."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self.input_storages = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        flat = list(args) + list((kwargs or {}).values())
        flat = [t for a in flat for t in (a if isinstance(a, (list, tuple)) else [a])]
        self.input_storages.append({t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)})
        return func(*args, **(kwargs or {}))

    def ops_reading(self, tensor):
        """Names of the ops that took ``tensor`` (or a view of it) as an input."""
        ptr = tensor.untyped_storage().data_ptr()
        return [op for op, storages in zip(self.ops, self.input_storages) if ptr in storages]


def randomize_(module, std=0.2):
    """AdaLN-Zero starts every block as the identity: give all weights random values to test anything."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


@pytest.fixture
def recorder():
    return OpRecorder


@pytest.fixture
def stock():
    """The stock blocks and helpers, for tests (importlib import mode: no `from conftest import`)."""
    return SimpleNamespace(DiTBlock=StockDiTBlock, JointBlock=StockJointBlock, Attention=StockAttention,
                           randomize_=randomize_)


FAST_PATH_OPS = ("adaln", "gated_adaln", "qk_norm_rotary", "rmsnorm", "rotary", "attention")


@pytest.fixture
def fast_path_calls(monkeypatch):
    """Records ``(op module, "forward" | "backward")`` for each call into an op's fast-path implementation
    (the function both its autograd.Function and its library op wrap)."""
    import importlib

    calls = []
    for name in FAST_PATH_OPS:
        module = importlib.import_module(f"fastdit.ops.{name}")
        for attr, direction in (("_forward_impl", "forward"), ("_backward_impl", "backward"),
                                ("_fused_forward_impl", "forward"), ("_fused_backward_impl", "backward")):
            if hasattr(module, attr):
                original = getattr(module, attr)

                def counted(*args, _original=original, _key=(name, direction)):
                    calls.append(_key)
                    return _original(*args)

                monkeypatch.setattr(module, attr, counted)
    return calls
