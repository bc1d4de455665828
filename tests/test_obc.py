import itertools
import warnings

import pytest
import torch
from breakdown import force_float32_breakdown, rows_with_positive_last_weight, well_conditioned_layer

from obc_lightning import HessianDampingWarning, exact_obc, layer_objective
from obc_lightning.grids import fit_grid
from obc_lightning.solvers.obc import greedy_fast, obs_step


def correlated_problem(rows, cols, seed=0, dtype=torch.float64, samples=None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=dtype)
    X = torch.randn(samples or 4 * cols, cols, generator=g, dtype=dtype)
    X = X @ (torch.eye(cols, dtype=dtype) + 0.3 * torch.randn(cols, cols, generator=g, dtype=dtype))
    return W, 2 * X.T @ X / X.shape[0]


def naive_obc_row(w, H, scale, zero, maxq):
    """ExactOBC for one row with H^-1 recomputed from scratch on the free set at every step."""
    w = w.clone()
    free = list(range(len(w)))
    codes = torch.zeros_like(w)
    while free:
        Hinv = torch.linalg.inv(H[free][:, free])
        wf = w[free]
        k = torch.clamp(torch.round(wf / scale[free]) + zero[free], 0, maxq)
        q = scale[free] * (k - zero[free])
        err = (wf - q) ** 2
        if (err > 0.25 * scale[free] ** 2).any():
            i = int(err.argmax())
        else:
            i = int((err / Hinv.diagonal()).argmin())
        codes[free[i]] = k[i]
        wf = wf - (wf[i] - q[i]) / Hinv[i, i] * Hinv[:, i]
        wf[i] = q[i]
        w[free] = wf
        free.pop(i)
    return codes


def test_single_step_by_hand():
    # H = [[2,1,0],[1,2,1],[0,1,2]]  =>  H^-1 = [[3,-2,1],[-2,4,-2],[1,-2,3]] / 4
    H = torch.tensor([[2.0, 1, 0], [1, 2, 1], [0, 1, 2]], dtype=torch.float64)
    Hinv = torch.linalg.inv(H).unsqueeze(0)
    assert torch.allclose(Hinv[0], torch.tensor([[3.0, -2, 1], [-2, 4, -2], [1, -2, 3]], dtype=torch.float64) / 4)
    w = torch.tensor([[1.0, 0.5, -0.3]], dtype=torch.float64)
    w0 = w.clone()
    loss = obs_step(w, Hinv, torch.tensor([0]), torch.tensor([1.25], dtype=torch.float64))
    # dL = 1/2 (q - w_p)^2 / [H^-1]_pp = 1/2 * 0.0625 / 0.75
    assert loss.item() == pytest.approx(0.5 * 0.0625 / 0.75)
    # delta = -(w_p - q) / [H^-1]_pp * H^-1[:, p] = (0.25 / 0.75) * [0.75, -0.5, 0.25]
    assert torch.allclose(w - w0, torch.tensor([[0.25, -1 / 6, 1 / 12]], dtype=torch.float64))
    # the compensation is optimal: the gradient H delta vanishes on the free weights
    delta = (w - w0)[0]
    assert torch.allclose((H @ delta)[1:], torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert loss.item() == pytest.approx(0.5 * float(delta @ H @ delta))
    # downdate: H^-1 loses row/col p and becomes the inverse of H on the remaining inputs
    assert torch.allclose(Hinv[0, 0], torch.zeros(3, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(Hinv[0, 1:, 1:], torch.linalg.inv(H[1:, 1:]))


@pytest.mark.parametrize("seed", range(6))
def test_reference_matches_naive_recomputed_inverse(seed):
    W, H = correlated_problem(5, 9, seed)
    bits = [2, 3, 4][seed % 3]
    res = exact_obc(W, H, bits, method="reference")
    grid = fit_grid(W, bits)
    s, z = grid.per_column()
    for r in range(W.shape[0]):
        assert torch.equal(res.codes[r].double(), naive_obc_row(W[r], H, s[r], z[r], grid.maxq))


@pytest.mark.parametrize("method", ["reference", "fast"])
def test_loss_is_layer_objective(method):
    W, H = correlated_problem(12, 30, seed=3)
    res = exact_obc(W, H, 3, method=method)
    assert torch.allclose(res.loss, layer_objective(W, res.quantized_matrix, H), rtol=1e-9)


CASES = list(
    itertools.product(
        [(7, 13), (20, 40), (3, 65)],  # shapes
        [2, 3, 4, 8],  # bits
        [dict(), dict(symmetric=True), dict(group_size=8), dict(mse=False), dict(group_size=5, symmetric=True)],
        ["plain", "dead", "pruned"],
    )
)


@pytest.mark.parametrize("shape,bits,opts,kind", CASES[::3])
def test_fast_equals_reference_float64(shape, bits, opts, kind):
    rows, cols = shape
    W, H = correlated_problem(rows, cols, seed=rows * bits + cols)
    if kind == "dead":
        dead = torch.arange(cols) % 5 == 1
        H[dead, :] = 0
        H[:, dead] = 0
    if kind == "pruned":
        W[torch.rand(rows, cols, generator=torch.Generator().manual_seed(1)) < 0.4] = 0
        W[0] = 0  # an all-pruned row
    ref = exact_obc(W, H, bits, method="reference", **opts)
    for block in (1, 4, 32):
        fast = exact_obc(W, H, bits, method="fast", block_size=block, **opts)
        assert torch.equal(fast.codes, ref.codes), (block, (fast.codes != ref.codes).sum())
        assert torch.allclose(fast.loss, ref.loss, rtol=1e-9, atol=1e-12)
    if kind == "dead":
        assert torch.all(ref.quantized_matrix[:, dead] == 0)
    if kind == "pruned":
        assert torch.all(ref.quantized_matrix[W == 0] == 0)


def test_fast_float32_is_as_accurate_as_plain_float32():
    # float32 greedy paths part at the first near-tie (the plain float32 loop itself lands about +-0.5 %
    # from the float64 result on a 32-row layer), so the fast path is held to the float64 objective
    # over several layers, with the plain float32 loop's own deviation as the yardstick (d = 256: the
    # reference loop costs rows * d^3, and 576 columns took minutes on a loaded 2-core machine)
    exact, plain, fast = 0.0, 0.0, 0.0
    for seed in range(3):
        W, H = correlated_problem(32, 256, seed=seed, dtype=torch.float32, samples=900)
        exact += exact_obc(W.double(), H.double(), 4, method="reference", damp=0.01).loss.sum().item()
        plain += exact_obc(W, H, 4, method="reference", damp=0.01).loss.sum().item()
        res = exact_obc(W, H, 4, method="fast", damp=0.01)
        fast += res.loss.sum().item()
    assert abs(fast / exact - 1) <= max(3e-3, 2 * abs(plain / exact - 1))


def test_float32_breakdown_is_resolved_in_float64(monkeypatch):
    W, H = well_conditioned_layer()
    force_float32_breakdown(monkeypatch)
    broken = rows_with_positive_last_weight(W)
    assert 0 < int(broken.sum()) < len(W)
    with pytest.warns(UserWarning, match=f"exact_obc: {int(broken.sum())} of 32 rows .* solved again in float64"):
        res = exact_obc(W, H, 4, block_size=64)
    assert torch.isfinite(res.loss).all() and torch.isfinite(res.quantized_matrix).all()
    objective = layer_objective(W.double(), res.quantized_matrix.double(), H.double())
    assert torch.allclose(objective, res.loss.double(), rtol=2e-2)
    exact = exact_obc(W.double(), H.double(), 4).loss.sum()
    assert abs(res.loss.sum().item() / exact.item() - 1) < 0.05


def test_a_row_whose_pivot_reaches_zero_is_reported_broken():
    # H^-1 exactly singular (inputs 0 and 1 duplicated; every value a small integer, so every rounding is
    # exact): whichever of the two is taken first, the other's pivot [H^-1]_pp becomes exactly 0
    hinv = torch.tensor([[4.0, 4.0, 0.0], [4.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    w = torch.tensor([[0.3, -0.7, 0.2], [0.1, 0.2, 0.3]])
    hinv_src = torch.stack([hinv, torch.eye(3)])
    scale, zero = torch.full((2, 3), 0.25), torch.full((2, 3), 4.0)
    for dtype in (torch.float32, torch.float64):
        codes, loss = greedy_fast(w.to(dtype), hinv_src.to(dtype), torch.tensor([0, 1]), scale.to(dtype),
                                  zero.to(dtype), 15)
        assert torch.isnan(loss[0]) and torch.isfinite(loss[1])


def test_result_fields_and_grid_identity():
    W, H = correlated_problem(10, 24, seed=2, dtype=torch.float32)
    res = exact_obc(W, H, 3, group_size=8)
    assert res.quantized_matrix.shape == W.shape and res.quantized_matrix.dtype == W.dtype
    assert res.codes.dtype == torch.int32 and res.codes.shape == W.shape
    assert res.codes.min() >= 0 and res.codes.max() <= 7
    assert res.scales.shape == (10, 3) and res.rounded_zeros.shape == (10, 3)
    g = torch.arange(24) // 8
    expected = res.scales[:, g] * (res.codes.float() - res.rounded_zeros[:, g])
    assert torch.equal(res.quantized_matrix, expected)
    assert torch.all(res.rounded_zeros == torch.round(res.rounded_zeros))


def test_obc_beats_round_to_nearest():
    W, H = correlated_problem(16, 48, seed=4)
    res = exact_obc(W, H, 3)
    rtn = fit_grid(W, 3).round(W)
    assert layer_objective(W, res.quantized_matrix, H).sum() < 0.7 * layer_objective(W, rtn, H).sum()


def test_batch_size_does_not_change_the_result_and_is_deterministic():
    W, H = correlated_problem(23, 20, seed=5, dtype=torch.float32)
    base = exact_obc(W, H, 4, batch_size=32)
    for bs in (1, 7, None):
        assert torch.equal(exact_obc(W, H, 4, batch_size=bs).codes, base.codes)
    assert torch.equal(exact_obc(W, H, 4, batch_size=32).quantized_matrix, base.quantized_matrix)


def test_inputs_not_modified():
    W, H = correlated_problem(6, 10, seed=6)
    W[0, :3] = 0
    H[2, :] = 0
    H[:, 2] = 0
    W0, H0 = W.clone(), H.clone()
    exact_obc(W, H, 4, damp=0.01)
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_half_precision_input_keeps_dtype():
    W, H = correlated_problem(4, 8, seed=8, dtype=torch.float32)
    res = exact_obc(W.half(), H, 4)
    assert res.quantized_matrix.dtype == torch.float16


def test_tinyvolt_readme_example():
    # TinyVolt's README, with only the import line changed
    import torch

    from obc_lightning import exact_obc

    torch.manual_seed(0)
    n_rows = 24
    n_cols = 5

    matrix = torch.randn(n_rows, n_cols)
    xs = torch.randn(100, n_cols)
    hessian = (xs.t() @ xs).div(xs.shape[0] - 1)
    quantized_matrix = exact_obc(matrix, hessian, n_bits=4)
    # you can use a smaller batch size if needed
    quantized_matrix = exact_obc(matrix, hessian, n_bits=4, batch_size=8)
    assert quantized_matrix.quantized_matrix.shape == matrix.shape
    assert quantized_matrix.scales.shape == (n_rows, 1)
    assert quantized_matrix.rounded_zeros.shape == (n_rows, 1)


def test_singular_hessian_escalates_damping_with_one_warning():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 20, generator=g, dtype=torch.float64)  # 5 samples, 20 inputs: rank 5
    H = X.T @ X
    W = torch.randn(8, 20, generator=g, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = exact_obc(W, H, 3)
    msgs = [str(w.message) for w in caught if issubclass(w.category, HessianDampingWarning)]
    assert len(msgs) == 1
    assert "20x20" in msgs[0] and "(8, 20)" in msgs[0] and "damp=" in msgs[0]
    assert res.damp > 0
    assert torch.isfinite(res.quantized_matrix).all()
    # not a silent fallback to round-to-nearest: the output error is far below RTN's
    rtn = fit_grid(W, 3).round(W)
    assert layer_objective(W, res.quantized_matrix, H).sum() < 0.5 * layer_objective(W, rtn, H).sum()


def test_indefinite_hessian_is_damped():
    # every 2x2 minor positive (no Cauchy-Schwarz violation, which is refused), eigenvalues 1.9, 1.9, -0.8
    H = torch.tensor([[1.0, 0.9, 0.9], [0.9, 1.0, -0.9], [0.9, -0.9, 1.0]], dtype=torch.float64)
    with pytest.warns(HessianDampingWarning):
        res = exact_obc(torch.tensor([[0.3, -0.7, 0.2]], dtype=torch.float64), H, 4)
    assert res.damp >= 1.0


def test_hessian_violating_cauchy_schwarz_is_refused():
    H = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # |H_01| > sqrt(H_00 H_11): no X^T X
    with pytest.raises(ValueError, match=r"exact_obc: hessian of shape \(2, 2\) is not positive semi-definite"):
        exact_obc(torch.tensor([[0.3, -0.7]], dtype=torch.float64), H, 4)


@pytest.mark.parametrize(
    "matrix,hessian,kwargs,match",
    [
        (torch.randn(3), torch.eye(3), {}, "2-D"),
        (torch.randn(2, 3), torch.eye(4), {}, r"\(3, 3\)"),
        (torch.randn(2, 3), torch.eye(3), {"n_bits": 1}, "n_bits"),
        (torch.randn(2, 3), torch.eye(3), {"n_bits": 9}, "n_bits"),
        (torch.tensor([[float("nan"), 1.0]]), torch.eye(2), {}, "NaN"),
        (torch.randn(2, 2), torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), {}, "NaN or Inf"),
        (torch.randn(2, 3), torch.eye(3), {"batch_size": 0}, "batch_size"),
        (torch.randn(2, 3), torch.eye(3), {"method": "magic"}, "method"),
        (torch.randn(2, 3), torch.eye(3), {"damp": -1.0}, "damp"),
        (torch.randn(2, 3), torch.eye(3), {"group_size": 4}, "group_size"),
        (torch.randint(0, 3, (2, 3)), torch.eye(3), {}, "floating"),
        (torch.randn(2, 3), -torch.eye(3), {}, "not positive semi-definite"),
    ],
)
def test_bad_inputs(matrix, hessian, kwargs, match):
    with pytest.raises(ValueError, match=match):
        exact_obc(matrix, hessian, **kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_float64():
    # compiled float64 contracts to FMA and cuBLAS sums in its own order: H^-1 agrees with the CPU's to
    # ~1e-13, not bit for bit, so a row's codes agree unless two of its candidates tie to ~1e-12 (then the
    # rest of that row may differ). What float64 promises: nearly every row identical, the objective equal
    # to ~1e-9 where codes are, and the total within 1e-6.
    W, H = correlated_problem(40, 96, seed=9)
    cpu = exact_obc(W, H, 4)
    gpu = exact_obc(W.cuda(), H.cuda(), 4)
    assert gpu.quantized_matrix.device.type == "cuda"
    same = (gpu.codes.cpu() == cpu.codes).all(dim=1)
    assert int(same.sum()) >= 38, int(same.sum())
    assert torch.allclose(gpu.loss.cpu()[same], cpu.loss[same], rtol=1e-9, atol=0)
    assert abs(gpu.loss.sum().item() / cpu.loss.sum().item() - 1) < 1e-6


# codes of exact_obc(W, H, 3, block_size=4 or 16) for correlated_problem(6, 40, seed=35) in float64, computed
# by the engine before issue 35 (in-place flushes of the whole working set, finished columns dropped when
# half of it): the live-block flush must not change them (they also equal the one-step loop's)
CODES_BEFORE_ISSUE_35 = [
    "4235747144334301315265431235036463344467", "3645533535460225746417532224457340452425",
    "4123324231423231332220433343652423061170", "4527230003472151332424674524553143011650",
    "3233523144157334050267355623520422226270", "3230142532356544724144115672755034030243",
]


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_live_block_flush_keeps_the_codes_float64(blocks, monkeypatch):
    import obc_lightning.solvers.obc as obc

    monkeypatch.setattr(obc, "symmetric_blocks", lambda device: blocks)
    W, H = correlated_problem(6, 40, seed=35)
    before = torch.tensor([[int(c) for c in row] for row in CODES_BEFORE_ISSUE_35], dtype=torch.int32)
    ref = exact_obc(W, H, 3, method="reference")
    assert torch.equal(ref.codes, before)
    for block in (4, 16):
        assert torch.equal(exact_obc(W, H, 3, block_size=block).codes, before)
    # rows with pruned weights read their own masked inverse (per-row sources of the first flush)
    W[torch.rand(W.shape, generator=torch.Generator().manual_seed(2)) < 0.3] = 0
    ref = exact_obc(W, H, 3, method="reference")
    assert torch.equal(exact_obc(W, H, 3, block_size=4).codes, ref.codes)


@pytest.mark.parametrize("blocks", [1, 3])
def test_flush_flops_counts_the_products_the_engine_runs(blocks):
    from torch.utils._python_dispatch import TorchDispatchMode

    from obc_lightning.solvers.obc import GridRule, flush_flops, greedy_loop_fast

    class Products(TorchDispatchMode):  # the flush products are the engine's only baddbmm calls
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith("baddbmm"):
                b, m, k = args[1].shape
                Products.flops += 2 * b * m * k * args[2].shape[2]
            return func(*args, **(kwargs or {}))

    W, H = correlated_problem(3, 50, seed=1)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(H)).unsqueeze(0)
    rule = GridRule(torch.full_like(W, 0.2), torch.full_like(W, 8.0), 15)
    with Products():
        greedy_loop_fast(W, hinv, torch.zeros(3, dtype=torch.long), rule, block_size=8, blocks=blocks)
    assert Products.flops == 3 * flush_flops(50, 8, "live", blocks) > 0
    # the schedule before issue 35, by hand: flushes after 8, 16, 24 steps update the whole 50 x 50 set in
    # place, the one after 32 drops the 32 finished columns (18 x 18 block), after 40 in place (18 x 18),
    # after 48 drops 16 (2 x 2); the engine of that time ran exactly this count (checked when it changed)
    assert flush_flops(50, 8, "half") == 2 * 8 * (3 * 50**2 + 2 * 18**2 + 2**2)
