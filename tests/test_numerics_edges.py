"""Scale-free calibration and solving, and the solvers' edge cases (issue 33, items 6 and 7).

Every breakdown here is built deterministically: Hessians with exactly representable entries whose
Cholesky pivots are exact (an exact duplicate column has pivot 0 in any precision and any order), and a
"lucky" float32 Cholesky (some BLAS return a factor of an exactly singular matrix with a tiny pivot) is
forced by wrapping ``torch.linalg.cholesky_ex``, never left to the CPU's rounding.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from obc_lightning import compress_model, exact_obc
from obc_lightning.calibration import collect_hessians
from obc_lightning.compress import check_against_model
from obc_lightning.config import CompressionConfig
from obc_lightning.grids import fit_grid
from obc_lightning.solvers import HessianDampingWarning, gptq, obs_prune, polish, product_quantize, quantize_weight
from obc_lightning.solvers.common import (
    DEAD_INPUT_TOL,
    HessianBreakdown,
    checked_cholesky,
    isolate_dead_inputs,
    solve_with_damping,
)

F32, F64 = torch.float32, torch.float64


# ------------------------------------------------------------------ item 6: activations of any scale
def mlp(seed: int = 0) -> nn.Module:
    """Bias-free Linear / ReLU layers: positively homogeneous, so input * 2^k scales every activation by
    2^k exactly (a power of two changes no float rounding while values stay normal)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16, bias=False), nn.ReLU(), nn.Linear(16, 8, bias=False))


@pytest.mark.parametrize("k", [-80, 66])  # activations ~1e-24 (products underflow float32), ~1e20 (overflow)
def test_hessian_of_scaled_activations_is_scaled_exactly(k):
    model = mlp()
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(1))
    targets = {"0": model[0], "2": model[2]}
    base = collect_hessians(model, [x, x[:7]], targets)
    scaled = collect_hessians(model, [x * 2.0**k, x[:7] * 2.0**k], targets)
    for name in targets:
        # every product of the scaled run is the base one times 4^k, summed in float64: equal, not close
        assert torch.equal(scaled[name].hessians, base[name].hessians * 4.0**k)


@pytest.mark.parametrize("mode", [{}, {"sequential": True}, {"bits": None, "sparsity": 0.5}],
                         ids=["one-pass", "sequential", "prune-only"])
@pytest.mark.parametrize("k", [-80, 66])
def test_model_with_tiny_or_huge_activations_compresses_as_the_rescaled_model(k, mode):
    """The issue's failure: at ~1e-24 every input was 'dead' (weights zeroed, loss 0), at ~1e20 'NaN or
    Inf'. With input * 2^k every Hessian is the base one times 4^k exactly (test above), the solvers see
    both divided by a power of 4, i.e. the same matrix, so the weights are the base run's and the
    relative errors equal up to the float64 rounding of loss / signal (1e-12 is generous)."""
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(2))
    kw = {"bits": 4, **mode}
    base, scaled = mlp(), mlp()
    rep0 = compress_model(base, [x], **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say: no 'dead' layer, no overflow
        rep1 = compress_model(scaled, [x * 2.0**k], **kw)
    for p0, p1 in zip(base.parameters(), scaled.parameters()):
        assert torch.equal(p0, p1)
    assert any(bool(p.detach().abs().sum() > 0) for p in scaled.parameters())
    for r0, r1 in zip(rep0.modules, rep1.modules):
        assert r1.rel_error == pytest.approx(r0.rel_error, rel=1e-12)
        assert r1.loss == pytest.approx(r0.loss * 4.0**k, rel=1e-12)  # the loss in the caller's units
        assert r0.rel_error > 0


def test_float64_activations_beyond_a_float64_hessian_are_refused():
    model = mlp().double()
    with pytest.raises(ValueError, match=r"module '0'.*beyond float64's range; rescale"):
        collect_hessians(model, [torch.randn(8, 12, dtype=F64) * 1e200], {"0": model[0]})


def test_nan_in_activations_is_still_named():
    model = mlp()
    x = torch.randn(8, 12)
    x[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"module '0'.*NaN or Inf"):
        collect_hessians(model, [x], {"0": model[0]})


@pytest.mark.parametrize("c", [4.0**-60, 1.0, 4.0**60])
def test_dead_inputs_relative_to_the_largest_diagonal(c):
    diag = torch.tensor([1.0, 0.5, 0.5 * DEAD_INPUT_TOL, 2 * DEAD_INPUT_TOL, 0.0], dtype=F64)
    _, dead, _ = isolate_dead_inputs(torch.diag(diag) * c)
    assert dead.tolist() == [False, False, True, False, True]


def test_solvers_take_a_tiny_hessian_as_the_rescaled_one():
    """A float32 matrix with a float64 Hessian far below float32's range: solved as H / 4^k (same codes),
    the loss reported in the caller's units (float64 matrix: finite)."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(6, 10, generator=g, dtype=F64)
    A = torch.randn(40, 10, generator=g, dtype=F64)
    H = A.T @ A / 40
    for f in (exact_obc, gptq, quantize_weight):
        ref = f(W.float(), H, 3)
        with pytest.warns(UserWarning, match="beyond the range of float32"):  # ~1e-60: the loss, said so
            res = f(W.float(), H * 4.0**-100, 3)
        assert torch.equal(res.codes, ref.codes)
        res64 = f(W, H * 4.0**-100, 3)
        assert torch.equal(res64.codes, f(W, H, 3).codes)
        assert torch.allclose(res64.loss * 4.0**100, f(W, H, 3).loss, rtol=1e-12)


# ------------------------------------------------------------------ item 7: rank-deficient H, damp=0
def duplicated_hessian(d: int = 8) -> torch.Tensor:
    """H = M^T M for orthogonal columns of norms 1 ... d-1 and column d-1 a copy of column 2: every
    Cholesky pivot is exact, the copy's is exactly 0 (singular in every precision and column order)."""
    a = torch.arange(1, d, dtype=F32)
    H = torch.zeros(d, d)
    H[: d - 1, : d - 1] = torch.diag(a * a)
    H[d - 1, d - 1] = H[2, d - 1] = H[d - 1, 2] = a[2] ** 2
    return H


@pytest.fixture
def lucky_float32_cholesky(monkeypatch):
    """float32 Cholesky factorizations that succeed on singular matrices, as some BLAS do by rounding:
    the factor of A + 2^-40 max diag(A) I (in float64) with info 0. float64 stays exact."""
    real = torch.linalg.cholesky_ex

    def cholesky_ex(A, *, upper=False, **kw):
        L, info = real(A, upper=upper, **kw)
        if A.dtype != F32 or not bool((info != 0).any()):
            return L, info
        d = A.shape[-1]
        eps = 2.0**-40 * A.diagonal(dim1=-2, dim2=-1).amax(dim=-1, keepdim=True).unsqueeze(-1).double()
        L2, info2 = real(A.double() + eps * torch.eye(d, dtype=F64), upper=upper)
        return (L2.to(F32), info2) if not bool((info2 != 0).any()) else (L, info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", cholesky_ex)


SOLVERS = {
    "exact_obc": lambda W, H: exact_obc(W, H, 3, damp=0.0),
    "gptq": lambda W, H: gptq(W, H, 3, damp=0.0),
    "quantize_weight": lambda W, H: quantize_weight(W, H, 3, damp=0.0),
    "obs_prune": lambda W, H: obs_prune(W, H, sparsity=0.5, damp=0.0),
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_exactly_singular_hessian_at_damp_0_escalates_everywhere(name, lucky_float32_cholesky):
    """The float32 factorization 'succeeds' at damp=0 (a pivot of 2^-40 max diag): ExactOBC's and OBS's
    rows then break down in float32 (the other inputs' pivots, ~1/a^2, fall below eps * max diag(H^-1)
    ~ 2^17) and their float64 re-solve meets the exactly singular H: the damping escalates, with one
    warning. GPTQ factors H in its column order and H^-1 through the same lucky float32 path: no
    escalation needed (on main its plain torch.linalg.cholesky raised). No LinAlgError; finite results."""
    H = duplicated_hessian()
    W = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = SOLVERS[name](W, H)
    out = res.pruned_matrix if name == "obs_prune" else res.quantized_matrix
    assert torch.isfinite(out).all() and torch.isfinite(res.loss).all()
    damping = [w for w in caught if issubclass(w.category, HessianDampingWarning)]
    if name == "gptq":
        assert res.damp == 0 and not damping
    else:
        assert res.damp > 0
        assert len(damping) == 1 and f"used damp={res.damp:g}" in str(damping[0].message)


def test_breakdown_in_float64_is_answered_with_more_damping():
    H = duplicated_hessian().double()
    with pytest.raises(HessianBreakdown):
        checked_cholesky(H, problem=0)  # exact zero pivot: fails in float64 too
    seen = []

    def solve(preps):
        seen.append(preps[0].damp)
        return checked_cholesky(preps[0].hessian)

    with pytest.warns(HessianDampingWarning, match=r"broke down at damp=0\b.*used damp=1e-06"):
        L = solve_with_damping("test", [H], 0.0, [(5, 8)], solve,
                               preps=[type("P", (), {"damp": 0.0, "hessian": H})()])
    assert seen == [0.0, 1e-6] and torch.isfinite(L).all()


# ------------------------------------------------------------------ item 7: one rule for non-PSD H
def not_psd_hessians() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    A = torch.randn(64, 5, generator=g)
    dead_coupled = A.T @ A / 64
    dead_coupled[2, 2] = 0  # the case: a zero diagonal with its off-diagonals kept
    coupled = torch.eye(5)
    coupled[0, 3] = coupled[3, 0] = 1.1  # |H_03| > sqrt(H_00 H_33) by 10 %: no X^T X, even rounded
    negative = torch.eye(5)
    negative[1, 1] = -0.5
    return {"dead-coupled": dead_coupled, "cauchy-schwarz": coupled, "negative-diagonal": negative}


@pytest.mark.parametrize("case", ["dead-coupled", "cauchy-schwarz", "negative-diagonal"])
def test_every_solver_refuses_a_hessian_that_is_not_psd(case):
    """One rule: what no 2/N X^T X can be, even rounded, is refused by every solver (on main quantize_weight
    reported a negative loss for the first case and the others accepted it)."""
    H = not_psd_hessians()[case]
    W = torch.randn(4, 5, generator=torch.Generator().manual_seed(6))
    grid = fit_grid(W, 3)
    calls = {
        "exact_obc": lambda: exact_obc(W, H, 3),
        "gptq": lambda: gptq(W, H, 3),
        "quantize_weight": lambda: quantize_weight(W, H, 3),
        "obs_prune": lambda: obs_prune(W, H, sparsity=0.5),
        "product_quantize": lambda: product_quantize(W, H, block_size=1, n_centroids=4),
        "polish": lambda: polish(W, H, grid.round(W), grid),
    }
    for fn, call in calls.items():
        with pytest.raises(ValueError, match=rf"{fn}: hessian of shape \(5, 5\) is not positive semi-definite"):
            call()


# ------------------------------------------------------------------ item 7: scale dtypes, weights to read
@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.float8_e4m3fn])
def test_non_floating_scale_dtypes_are_refused(dtype):
    W, H = torch.randn(4, 6), torch.eye(6)
    with pytest.raises(ValueError, match="quantize_weight: scale_dtype must be None or a floating dtype"):
        quantize_weight(W, H, 4, scale_dtype=dtype)
    with pytest.raises(ValueError, match="fit_grid: scale_dtype must be"):
        fit_grid(W, 4, scale_dtype=dtype)
    model = nn.Sequential(nn.Linear(6, 4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="compress_model: scale_dtype must be"):
        compress_model(model, [torch.randn(8, 6)], scale_dtype=dtype)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "make,match,later",
    [
        (lambda: nn.LazyLinear(4), r"module '1' \(LazyLinear\) is a lazy module whose weight is not initialized",
         True),
        (lambda: nn.Linear(16, 0), r"module '1' \(Linear\) has an empty weight of shape \(0, 16\)", False),
        (lambda: nn.Linear(16, 4, device="meta"), r"module '1' \(Linear\) is on the meta device", True),
    ],
    ids=["lazy", "empty", "meta"],
)
def test_weights_without_values_are_named(make, match, later):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LazyLinear's "under development", Linear(16, 0)'s init
        model = nn.Sequential(nn.Linear(16, 16), make())
    with pytest.raises(ValueError, match="compress_model: " + match):
        compress_model(model, [torch.randn(8, 16)])
    targets = {"0": model[0], "1": model[1]}
    with pytest.raises(ValueError, match="OBCQuantize: " + match):
        check_against_model(CompressionConfig(), targets, "OBCQuantize")
    if later:  # before fit, lazy and meta weights may still be materialized (by training, by the strategy)
        check_against_model(CompressionConfig(), targets, "OBCQuantize", before_fit=True)
    else:
        with pytest.raises(ValueError, match="OBCQuantize: " + match):
            check_against_model(CompressionConfig(), targets, "OBCQuantize", before_fit=True)


def test_callback_refuses_an_empty_weight_before_training(tmp_path):
    """At setup: a zero-size layer (a lazy or meta weight may still be materialized by training, and is
    checked when the callback compresses: test_weights_without_values_are_named, before_fit)."""
    import lightning.pytorch as pl
    from quiet_trainer import quiet_trainer
    from torch.utils.data import DataLoader, TensorDataset

    from obc_lightning import OBCQuantize

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(16, 16)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Linear(16, 0)'s init
                self.head = nn.Linear(16, 0)

        def training_step(self, batch, batch_idx):
            return self.head(self.body(batch[0])).sum() + self.body(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    model = Net()
    w0 = model.body.weight.detach().clone()
    data = DataLoader(TensorDataset(torch.randn(16, 16)), batch_size=8)
    cb = OBCQuantize(bits=4, calibration_batches=1, evaluate=False)
    with pytest.raises(ValueError, match=r"OBCQuantize: module 'head' \(Linear\) has an empty weight"):
        quiet_trainer(tmp_path, max_steps=1, callbacks=[cb]).fit(model, data)
    assert torch.equal(model.body.weight, w0)  # refused before training
