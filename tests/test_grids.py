import itertools

import pytest
import torch

from obc_lightning.grids import MSE_NORM, dequantize, fit_grid, quantize_codes


def test_minmax_asymmetric_by_hand():
    w = torch.tensor([[-1.0, 0.6, 2.0]], dtype=torch.float64)
    g = fit_grid(w, 2, mse=False)
    # range [-1, 2], 3 steps: scale 1, zero round(1 / 1) = 1
    assert g.scales.item() == pytest.approx(1.0)
    assert g.zeros.item() == 1
    assert torch.equal(g.codes(w), torch.tensor([[0, 2, 3]], dtype=torch.int32))
    assert torch.allclose(g.round(w), torch.tensor([[-1.0, 1.0, 2.0]], dtype=torch.float64))


def test_minmax_range_always_contains_zero():
    w = torch.tensor([[1.0, 2.0, 3.0], [-3.0, -2.0, -1.0]])
    g = fit_grid(w, 4, mse=False)
    assert torch.allclose(g.scales.squeeze(1), torch.tensor([3 / 15, 3 / 15]))
    assert g.zeros.tolist() == [[0.0], [15.0]]
    assert torch.equal(g.round(torch.zeros(2, 3)), torch.zeros(2, 3))


def test_symmetric_zero_point_is_midpoint():
    w = torch.randn(5, 20)
    for bits in (2, 3, 4, 8):
        g = fit_grid(w, bits, symmetric=True, mse=False)
        assert torch.all(g.zeros == 2 ** (bits - 1))
        xmax = w.abs().amax(dim=1, keepdim=True)
        assert torch.allclose(g.scales, 2 * xmax / (2**bits - 1))


def test_all_zero_row_gets_unit_range():
    g = fit_grid(torch.zeros(2, 4), 3, mse=False)
    assert torch.all(g.scales > 0)
    assert torch.equal(g.round(torch.zeros(2, 4)), torch.zeros(2, 4))


@pytest.mark.parametrize("bits,symmetric,group_size", itertools.product([2, 3, 4, 8], [False, True], [None, 4, 7]))
def test_round_is_nearest_grid_point_brute_force(bits, symmetric, group_size):
    torch.manual_seed(bits)
    w = torch.randn(6, 17, dtype=torch.float64)
    g = fit_grid(w, bits, symmetric=symmetric, group_size=group_size)
    s, z = g.per_column()
    all_codes = torch.arange(2**bits, dtype=torch.float64).view(-1, 1, 1)
    candidates = dequantize(all_codes, s, z)  # (2^b, rows, cols)
    nearest = (candidates - w).abs().amin(dim=0)
    assert torch.allclose((g.round(w) - w).abs(), nearest)
    codes = g.codes(w)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert torch.equal(g.dequantize(codes), g.round(w))


def test_mse_search_never_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.randn(32, 64) * torch.rand(32, 1) + 0.1 * torch.randn(32, 64) ** 3
    for bits in (2, 3, 4):
        plain, searched = fit_grid(w, bits, mse=False), fit_grid(w, bits, mse=True)

        def err(g):
            return (g.round(w) - w).abs().pow(MSE_NORM).sum(dim=1)

        assert torch.all(err(searched) <= err(plain) * (1 + 1e-6))
        assert err(searched).sum() < err(plain).sum()  # heavy tails: shrinking helps at low bits


def test_groups_shape_and_ragged_last_group():
    w = torch.randn(3, 10)
    g = fit_grid(w, 4, group_size=4, mse=False)
    assert g.scales.shape == (3, 3)
    assert g.column_groups().tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    # the last group (2 columns) has its own range
    last = w[:, 8:]
    xmax = last.clamp(min=0).amax(dim=1)
    xmin = last.clamp(max=0).amin(dim=1)
    assert torch.allclose(g.scales[:, 2], (xmax - xmin) / 15)


def test_quantize_codes_clamps():
    s, z = torch.tensor(1.0), torch.tensor(2.0)
    assert quantize_codes(torch.tensor([-10.0, 10.0]), s, z, 3).tolist() == [0.0, 3.0]


@pytest.mark.parametrize("bits", [1, 9, 4.0, True, "4"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="n_bits"):
        fit_grid(torch.randn(2, 3), bits)


@pytest.mark.parametrize("gs", [0, -1, 2.5, 5])
def test_bad_group_size(gs):
    with pytest.raises(ValueError, match="group_size"):
        fit_grid(torch.randn(2, 4), 4, group_size=gs)


def _loop_search(w, n_bits, symmetric):
    """The scale search one candidate at a time (the oracle of the blocked search in fit_grid)."""
    from obc_lightning.grids import MSE_MIN_RANGE, MSE_STEPS, _range_params, round_to_grid

    maxq = 2**n_bits - 1
    xmin, xmax = w.amin(dim=1, keepdim=True).clamp(max=0), w.amax(dim=1, keepdim=True).clamp(min=0)
    scale, zero = _range_params(xmin, xmax, maxq, symmetric)
    best = torch.full_like(scale, float("inf"))
    for p in torch.linspace(1.0, MSE_MIN_RANGE, MSE_STEPS).tolist():
        s1, z1 = _range_params(p * xmin, p * xmax, maxq, symmetric)
        err = (round_to_grid(w, s1, z1, maxq) - w).abs().pow(MSE_NORM).sum(dim=1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s1, scale), torch.where(better, z1, zero)
    return scale, zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [1, 1000, None])
def test_blocked_scale_search_equals_the_candidate_loop(dtype, block, monkeypatch):
    import obc_lightning.grids as grids

    if block is not None:
        monkeypatch.setattr(grids, "MSE_BLOCK_ELEMENTS", block)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 40, generator=g, dtype=dtype) * torch.exp(torch.randn(24, 1, generator=g, dtype=dtype))
    w[0, :5] = 0
    for bits, symmetric in [(2, False), (4, True), (8, False)]:
        s, z = _loop_search(w, bits, symmetric)
        grid = fit_grid(w, bits, symmetric=symmetric)
        assert torch.equal(grid.scales, s) and torch.equal(grid.zeros, z)
