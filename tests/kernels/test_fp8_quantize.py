"""fastdit.kernels.fp8_quantize: one amax pass and one quantising pass give quantize_rows(t) and
quantize_rows(t^T) (padded with zero columns) bit for bit, for any strides, odd sizes, both fp8 formats, either
side alone, and rows of zeros; the kernel's round-to-nearest-even onto the fp8 grid ties included."""
import pytest
import torch

from fastdit.kernels import _utils
from fastdit.kernels.fp8_quantize import quantize_rows_cols
from fastdit.ops.fp8_linear import EPS, quantize_rows

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.fixture(autouse=True)
def poisoned():
    _utils.POISON_OUTPUTS = True
    yield
    _utils.POISON_OUTPUTS = False


@pytest.mark.parametrize("R,C", [(1, 1), (7, 33), (113, 72), (130, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("row_dtype,col_dtype", [(E4M3, E4M3), (E5M2, None), (None, E5M2), (E4M3, E5M2)])
@pytest.mark.parametrize("pad_to", [1, 16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_rows_and_columns_equal_quantize_rows_bit_for_bit(R, C, dtype, row_dtype, col_dtype, pad_to, layout, device):
    t = (torch.randn(R, C) * torch.rand(R, 1) * 10).to(device, dtype)
    if R > 3:
        t[2] = 0  # a row of zeros: scale EPS / fmax, data 0
    if layout == "transposed":
        t = t.t().contiguous().t()
    rows, row_scale, cols_t, col_scale = quantize_rows_cols(t, row_dtype, col_dtype, EPS, pad_to=pad_to,
                                                            block_r=32, block_c=32)
    if row_dtype is None:
        assert rows is None and row_scale is None
    else:
        data, scale = quantize_rows(t, row_dtype)
        assert same_bits(rows, data.contiguous()) and torch.equal(row_scale, scale)
    if col_dtype is None:
        assert cols_t is None and col_scale is None
    else:
        data, scale = quantize_rows(t.t(), col_dtype)
        R_pad = -(-R // pad_to) * pad_to
        assert cols_t.shape == (C, R_pad) and cols_t.is_contiguous()
        assert same_bits(cols_t[:, :R].contiguous(), data.contiguous()) and torch.equal(col_scale, scale)
        assert (cols_t[:, R:].float() == 0).all()


@pytest.mark.parametrize("fp8", [E4M3, E5M2])
def test_every_fp8_value_and_every_tie_rounds_as_torch(fp8, device):
    """A row holding fmax (so its scale is exactly 1), every finite fp8 value and every midpoint between
    neighbours: the kernel's rounding gives torch's cast, ties to even."""
    values = torch.arange(256, dtype=torch.uint8).view(fp8).float()
    values = values[values.isfinite()].unique()
    mids = (values[1:] + values[:-1]) / 2
    row = torch.cat([values, mids]).to(device)
    assert row.abs().max().item() == torch.finfo(fp8).max
    rows, scale, _, _ = quantize_rows_cols(row[None, :], fp8, None, EPS)
    assert scale.item() == 1.0
    assert same_bits(rows[0], row.to(fp8))
