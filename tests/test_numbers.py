"""Issue 23, "silent wrong numbers" in the solvers: non-symmetric Hessians, extreme weight magnitudes,
PQ codebooks that float16 cannot hold, and the reported loss against the true objective."""

import warnings

import pytest
import torch
from torch import nn

from obc_lightning import compress_model, exact_obc, save_quantized
from obc_lightning.grids import fit_grid
from obc_lightning.solvers import gptq, layer_objective, obs_prune, polish, product_quantize, quantize_weight

F64 = torch.float64
HESSIAN_SYMMETRY_TOL = 1e-3  # the stated tolerance (obc_lightning.solvers.common.symmetric_hessian)


def hessian(d, n, seed=0, dtype=torch.float32):
    """2/N X^T X of n samples (rank-deficient when n < d), made exactly symmetric."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64) * (torch.rand(d, generator=g, dtype=F64) + 0.2)
    H = (2 / n * X.T @ X).to(dtype)
    return H * 0.5 + H.T * 0.5


def matrix(rows, d, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d, generator=g, dtype=F64).to(dtype)


def solve(name, W, H):
    """Every solver entry point on (W, H); returns (result, its matrix)."""
    if name == "exact_obc":
        r = exact_obc(W, H, 4)
    elif name == "gptq":
        r = gptq(W, H, 4)
    elif name == "quantize_weight":
        r = quantize_weight(W, H, 4, scale_dtype=None)
    elif name == "polish":
        grid = fit_grid(W, 4)
        r = polish(W, H, grid.round(W), grid)
    elif name == "obs_prune":
        r = obs_prune(W, H, n_m=(2, 4))
    elif name == "obs_prune_unstructured":
        r = obs_prune(W, H, sparsity=0.5)
    else:
        r = product_quantize(W, H, block_size=4, n_centroids=8, codebook_dtype=None)
    return r, (r.pruned_matrix if hasattr(r, "pruned_matrix") else r.quantized_matrix)


ENTRY_POINTS = ["exact_obc", "gptq", "quantize_weight", "polish", "obs_prune", "product_quantize"]


# ------------------------------------------------------------------ Hessians must be symmetric
@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_non_symmetric_hessian_is_refused_by_every_entry_point(fn):
    W, H = matrix(6, 16), hessian(16, 64)
    bad = H.clone()
    bad[0, 5] += 0.01 * float(H.abs().max())  # 1 % of max|H|: not rounding, only the upper triangle
    with pytest.raises(ValueError, match=rf"{fn}: hessian of shape \(16, 16\) is not symmetric"):
        solve(fn, W, bad)


@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_rounding_asymmetry_is_symmetrised_and_the_tolerance_is_as_stated(fn):
    W, H = matrix(6, 16), hessian(16, 64, dtype=F64)
    top = float(H.abs().max())
    E = torch.zeros_like(H)
    E[2, 9] = 0.9 * HESSIAN_SYMMETRY_TOL * top  # just inside the stated tolerance: used as (H + H^T) / 2
    _, Q = solve(fn, W, H + E)
    _, Q_sym = solve(fn, W, H + 0.5 * (E + E.T))
    assert torch.equal(Q, Q_sym)
    E[2, 9] = 1.1 * HESSIAN_SYMMETRY_TOL * top  # just beyond: refused
    with pytest.raises(ValueError, match="not symmetric"):
        solve(fn, W, H + E)


def test_the_stated_tolerance_is_the_one_used():
    from obc_lightning.solvers import common

    assert common.HESSIAN_SYMMETRY_TOL == HESSIAN_SYMMETRY_TOL


def test_float32_accumulation_asymmetry_is_far_below_the_tolerance():
    # a user's float32 X^T X over 64 batches, (i, j) and (j, i) summed in opposite batch orders: the
    # asymmetry float32 accumulation can leave, on inputs with a large common offset (the worst case)
    g = torch.Generator().manual_seed(0)
    d = 64
    xs = [torch.randn(256, d, generator=g) * (torch.rand(d, generator=g) * 3) + 5.0 for _ in range(64)]
    forward, backward = torch.zeros(d, d), torch.zeros(d, d)
    for x in xs:
        forward += x.T @ x
    for x in reversed(xs):
        backward += x.T @ x
    H = torch.triu(forward) + torch.tril(backward, -1)
    rel = float((H - H.T).abs().max() / H.abs().max())
    assert 0 < rel < 1e-2 * HESSIAN_SYMMETRY_TOL
    exact_obc(matrix(4, d), H, 4)  # accepted, as (H + H^T) / 2


# ------------------------------------------------------------------ extreme weight magnitudes
@pytest.mark.parametrize("fn", ["exact_obc", "gptq", "quantize_weight", "polish", "obs_prune"])
def test_rows_at_1e20_and_1e_minus_20_give_the_scaled_result_of_the_unit_row(fn):
    # the objective is covariant per row: row * s -> result * s, objective * s^2 (s a power of two: exact)
    H = hessian(32, 64)
    w = matrix(1, 32)
    w = w / w.abs().max() * 0.75  # max|w| in [1/2, 1): the unit row, solved as given
    S = 2.0**67  # 1.5e20
    W = torch.cat([w, w * S, w / S])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res, Q = solve(fn, W, H)
    assert not [c for c in caught if "broke down" in str(c.message) or "Hessian" in str(c.message)]
    assert torch.equal(Q[1], Q[0] * S) and torch.equal(Q[2], Q[0] / S)
    # the loss: the float64 objective rounded to float32 (inf or 0 beyond float32's range, announced)
    true = layer_objective(W.double(), Q.double(), H.double())
    assert torch.equal(res.loss, true.float())
    if not (torch.isfinite(res.loss) & (res.loss > 0)).all():
        assert any("beyond the range of float32" in str(c.message) for c in caught)
    res64, Q64 = solve(fn, W.double(), H.double())
    assert torch.equal(Q64[1], Q64[0] * S) and torch.equal(Q64[2], Q64[0] / S)
    torch.testing.assert_close(res64.loss[1:], res64.loss[0] * torch.tensor([S * S, 1 / (S * S)], dtype=F64),
                               rtol=1e-13, atol=0)


@pytest.mark.parametrize("fn", ["obs_prune_unstructured", "product_quantize"])
def test_a_whole_matrix_at_1e20_or_1e_minus_20_gives_the_scaled_result(fn):
    # the global sparsity selection and the shared PQ codebook couple the rows: scale the whole matrix
    H, W = hessian(32, 64), matrix(8, 32)
    _, Q = solve(fn, W, H)
    for S in (2.0**67, 2.0**-67):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the float32 objective is out of range at 1e20: announced
            _, QS = solve(fn, W * S, H)
        assert torch.equal(QS, Q * S)


# ------------------------------------------------------------------ product quantization codebooks
@pytest.mark.parametrize("scale", [1e5, 1e-10])
@pytest.mark.parametrize("hessian_aware", [True, False])
def test_pq_codebook_beyond_float16_is_kept_not_written_as_inf_or_zero(scale, hessian_aware):
    H, W = hessian(32, 64), matrix(16, 32) * 0.5
    Hh = H if hessian_aware else None
    unit = product_quantize(W, Hh, block_size=4, n_centroids=8, codebook_dtype=None)
    match = r"codebook_dtype=float16 cannot hold this codebook .* scale_dtype=torch.float32"
    with pytest.warns(UserWarning, match=match):
        res = product_quantize(W * scale, Hh, block_size=4, n_centroids=8)
    assert torch.isfinite(res.quantized_matrix).all() and torch.isfinite(res.codebook).all()
    assert (res.codebook.abs().amax() > 0.5 * scale) and res.codebook.dtype == torch.float32
    # the same quality as the unit matrix (the codes are those of W, the objective scale^2 times)
    assert float(res.loss.sum()) == pytest.approx(float(unit.loss.sum()) * scale**2, rel=1e-3)


def test_pq_codebook_within_float16_is_still_rounded_to_it():
    H, W = hessian(32, 64), matrix(16, 32) * 1e-3  # entries down to the float16 subnormals: still stored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = product_quantize(W, H, block_size=4, n_centroids=8)
    assert torch.equal(res.codebook.half().float(), res.codebook)


class Net(nn.Module):
    def __init__(self, scale):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 4)
        with torch.no_grad():
            self.fc1.weight.mul_(scale / self.fc1.weight.abs().max())  # max |w| = scale

    def forward(self, x):
        return self.fc2(self.fc1(x).tanh())


@pytest.mark.parametrize("scale", [1e5, 1e-10])
def test_compress_model_pq_at_extreme_magnitudes_writes_finite_weights_and_names_the_module(scale, tmp_path):
    model = Net(scale)
    batches = [torch.randn(32, 16) for _ in range(2)]
    match = r"compress_model: module 'fc1': scale_dtype=float16 cannot hold this codebook"
    with pytest.warns(UserWarning, match=match):
        report = compress_model(model, batches, method="pq", block_size=4, n_centroids=8, keep_results=True)
    w = model.fc1.weight
    assert torch.isfinite(w).all() and float(w.detach().abs().max()) > 0.1 * scale
    assert report["fc1"].rel_error < 0.5
    with pytest.raises(ValueError, match=r"'fc1': scale_dtype=float16 cannot represent .* scale_dtype=torch.float32"):
        save_quantized(model, tmp_path / "m.safetensors", report)
    save_quantized(model, tmp_path / "m.safetensors", report, scale_dtype=torch.float32)


# ------------------------------------------------------------------ the reported loss is the true objective
@pytest.mark.parametrize("fn", ["exact_obc", "gptq", "quantize_weight", "polish", "obs_prune",
                                "obs_prune_unstructured", "product_quantize"])
@pytest.mark.parametrize("damp", [0.0, 0.05])
def test_reported_loss_is_the_true_objective_on_a_rank_deficient_hessian(fn, damp):
    # float32, rank 24 < d = 96: ExactOBC's accumulated step losses drifted by up to 15 % from the objective
    W, H = matrix(32, 96), hessian(96, 24)
    kw = {} if fn == "polish" else {"damp": damp}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the damping escalates on a singular H: announced, not tested here
        if fn == "exact_obc":
            res = exact_obc(W, H, 4, **kw)
        elif fn == "gptq":
            res = gptq(W, H, 4, **kw)
        elif fn == "quantize_weight":
            res = quantize_weight(W, H, 4, **kw)
        elif fn == "polish":
            grid = fit_grid(W, 4)
            res = polish(W, H, grid.round(W), grid)
        elif fn == "obs_prune":
            res = obs_prune(W, H, n_m=(2, 4), **kw)
        elif fn == "obs_prune_unstructured":
            res = obs_prune(W, H, sparsity=0.5, **kw)
        else:
            res = product_quantize(W, H, block_size=4, n_centroids=16, **kw)
    Q = res.pruned_matrix if hasattr(res, "pruned_matrix") else res.quantized_matrix
    true = layer_objective(W.double(), Q.double(), H.double())  # caller's W and undamped H, in float64
    assert res.loss.dtype == torch.float32
    torch.testing.assert_close(res.loss.double(), true, rtol=2**-23, atol=0)
