"""Layers of one width solved together (quantize_weights) give each layer exactly what it gets alone."""

import warnings

import pytest
import torch
from breakdown import force_float32_breakdown, rows_with_positive_last_weight, well_conditioned_layer

import obc_lightning.solvers.obc as obc
from obc_lightning.kernels import ENV
from obc_lightning.solvers.common import prepare_hessian
from obc_lightning.solvers.obc import _row_bytes, solve_obc_layers, solve_obc_rows
from obc_lightning.solvers.quantize import quantize_weight, quantize_weights


def layers(dtype, d=24, rows=(5, 9, 3, 12), seed=0):
    """(W, H) pairs of one width: layer 1 has a dead input, layer 2 pruned (exactly 0) weights."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(rows):
        mix = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
        X = torch.randn(4 * d, d, generator=g, dtype=torch.float64) @ mix
        if i == 1:
            X[:, 3] = 0
        W = torch.randn(r, d, generator=g, dtype=torch.float64)
        if i == 2:
            W[W.abs() < 0.5] = 0
        out.append((W.to(dtype), (2 * X.T @ X / X.shape[0]).to(dtype)))
    return out


def assert_same(one, many):
    assert len(one) == len(many)
    for a, b in zip(one, many):
        assert torch.equal(a.codes, b.codes)
        assert torch.equal(a.loss, b.loss)
        assert torch.equal(a.quantized_matrix, b.quantized_matrix)
        assert torch.equal(a.scales, b.scales) and torch.equal(a.rounded_zeros, b.rounded_zeros)
        assert a.solver_rows == b.solver_rows and a.damp == b.damp


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("solver", ["obc", "gptq", "auto"])
@pytest.mark.parametrize("opts", [{}, dict(group_size=8, symmetric=True)])
def test_batched_layers_equal_one_layer_at_a_time(dtype, solver, opts, monkeypatch):
    monkeypatch.setenv(ENV, "torch")
    pairs = layers(dtype)
    one = [quantize_weight(W, H, 3, solver=solver, **opts) for W, H in pairs]
    assert_same(one, quantize_weights(pairs, 3, solver=solver, **opts))
    if solver == "auto":  # both solvers won rows somewhere: the per-row choice is exercised
        assert sum(r.solver_rows["obc"] for r in one) and sum(r.solver_rows["gptq"] for r in one)


def test_row_batches_span_layers_with_the_same_result(monkeypatch):
    monkeypatch.setenv(ENV, "torch")
    pairs = layers(torch.float32)
    one = [quantize_weight(W, H, 4, solver="obc") for W, H in pairs]
    sizes = []
    real = obc._greedy

    def spy(method, w, src, row_src, *args):
        sizes.append((w.shape[0], src.shape[0]))
        return real(method, w, src, row_src, *args)

    monkeypatch.setattr(obc, "_greedy", spy)
    # the 4 stacked inverses come out of the budget, then 7 rows per batch (zero-aware: own inverses)
    budget = 4 * 24 * 24 * 4 + 7 * _row_bytes(24, torch.float32, "fast", masked=True)
    many = quantize_weights(pairs, 4, solver="obc", max_memory=budget)
    assert [n for n, _ in sizes] == [7, 7, 7, 7, 1]  # 29 rows of 4 layers
    # a batch without pruned rows reads the stacked inverses; one with them, its layers' plus its own
    assert sizes[0][1] == 4 and sizes[1][1] > 2
    assert_same(one, many)


def test_fused_kernels_batched_equal_one_layer_at_a_time(monkeypatch):
    monkeypatch.setenv(ENV, "triton")  # interpreted on CPU tensors
    pairs = layers(torch.float64, d=16, rows=(3, 5, 2))
    one = [quantize_weight(W, H, 3) for W, H in pairs]
    assert_same(one, quantize_weights(pairs, 3))
    monkeypatch.setenv(ENV, "torch")  # and the same codes as the torch path (float64)
    for a, b in zip(one, [quantize_weight(W, H, 3) for W, H in pairs]):
        assert torch.equal(a.codes, b.codes)


def test_float64_fallback_per_layer(monkeypatch):
    # rows broken in float32 are solved again in float64, each layer's with its own inverse, and each
    # layer warns as when solved alone
    monkeypatch.setenv(ENV, "torch")
    force_float32_breakdown(monkeypatch)
    W, H = well_conditioned_layer()
    d = W.shape[1]
    # two layers of 3 rows, the second with H scaled (its own inverse) and a row with pruned weights
    Ws = [W[:3], W[3:6].clone()]
    Ws[1][0, ::3] = 0
    assert all(rows_with_positive_last_weight(W).any() for W in Ws)
    preps = [prepare_hessian(h, 0.0, fn="test", matrix_shape=(3, d)) for h in (H, 2 * H)]
    from obc_lightning.grids import fit_grid

    grids = [fit_grid(W, 4) for W in Ws]
    with warnings.catch_warnings(record=True) as alone:
        warnings.simplefilter("always")
        one = [solve_obc_rows(W, p, gr, block_size=64) for W, p, gr in zip(Ws, preps, grids)]
    s = torch.cat([gr.per_column()[0] for gr in grids])
    z = torch.cat([gr.per_column()[1] for gr in grids])
    with warnings.catch_warnings(record=True) as together:
        warnings.simplefilter("always")
        codes, loss = solve_obc_layers(torch.cat(Ws), [3, 3], preps, s, z, 15, block_size=64)
    assert len(alone) == 2 and sorted(str(w.message) for w in alone) == sorted(str(w.message) for w in together)
    assert torch.equal(codes, torch.cat([c for c, _ in one])) and torch.equal(loss, torch.cat([lo for _, lo in one]))
    assert torch.isfinite(loss).all()


def test_quantize_weights_refuses_mixed_widths():
    [(W1, H1)], [(W2, H2)] = layers(torch.float64, d=8, rows=(2,)), layers(torch.float64, d=12, rows=(2,))
    with pytest.raises(ValueError, match="quantize_weights: every matrix must have the same number of columns"):
        quantize_weights([(W1, H1), (W2, H2)])
    with pytest.raises(ValueError, match="quantize_weights: problems must be a non-empty list"):
        quantize_weights([])
    with pytest.raises(ValueError, match=r"quantize_weights: hessian must be \(cols x cols\)"):
        quantize_weights([(W1, H2)])


# ------------------------------------------------------------------ compress_model: batched by width
class Net(torch.nn.Module):
    """Widths: conv1 27; conv2, conv3 72; gconv 2 groups of 36; fc1, fc2, head 16 (and q, k share an input)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv4 = nn.Conv2d(8, 4, 1)
        self.fc1 = nn.Linear(16, 16)
        self.q = nn.Linear(16, 16)
        self.k = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = self.conv3(self.conv2(self.conv1(x).relu()).relu())
        h = self.conv4(self.gconv(h).relu())
        h = self.fc1(torch.nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)).relu()
        return self.head(self.q(h) * self.k(h))


def net(dtype=torch.float32):
    torch.manual_seed(0)
    return Net().to(dtype)


def images(dtype=torch.float32, n=2):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 6, 6, generator=g).to(dtype) for _ in range(n)]


def one_at_a_time(monkeypatch):
    """compress_model solving one module at a time (the path batching must reproduce)."""
    import functools

    import obc_lightning.compress as compress

    monkeypatch.setattr(compress, "solve_modules", functools.partial(compress.solve_modules, batch_by_width=False))


def compare(a, b, ra, rb):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert [m.name for m in ra.modules] == [m.name for m in rb.modules]
    for x, y in zip(ra.modules, rb.modules):
        assert {**vars(x), "seconds": 0} == {**vars(y), "seconds": 0}, x.name
    if ra.results is not None:
        for name in ra.results:
            for u, v in zip(ra.results[name], rb.results[name]):
                assert torch.equal(u.codes, v.codes) and torch.equal(u.scales, v.scales), name


@pytest.mark.parametrize("dtype,opts", [
    (torch.float32, dict(bits=4)),
    (torch.float64, dict(bits=3, solver="obc", group_size=8)),
    (torch.float32, dict(bits=4, sparsity=0.5, solver="gptq")),
    (torch.float32, dict(bits=4, n_m=(2, 4), exclude="conv1")),
    (torch.float32, dict(bits=None, sparsity=0.5)),
    (torch.float32, dict(bits=4, sequential=True)),
])
def test_compress_model_batched_equals_one_module_at_a_time(dtype, opts, monkeypatch):
    from obc_lightning import compress_model

    monkeypatch.setenv(ENV, "torch")
    batched, alone = net(dtype), net(dtype)
    calls = []
    import obc_lightning.scheduling as qmod  # compress_model solves through this module's name

    real = qmod.quantize_weights

    def spy(problems, *args, **kwargs):
        calls.append(len(problems))
        return real(problems, *args, **kwargs)

    monkeypatch.setattr(qmod, "quantize_weights", spy)
    rb = compress_model(batched, images(dtype), keep_results=True, **opts)
    widths = calls[:]
    one_at_a_time(monkeypatch)
    calls.clear()
    ra = compress_model(alone, images(dtype), keep_results=True, **opts)
    compare(batched, alone, rb, ra)
    assert [m.name for m in rb.modules] == [n for n, _ in batched.named_modules() if n in rb.results]  # model order
    if opts.get("bits") is not None:
        # batched: conv2 + conv3 in one call, gconv's two groups in one, fc1 + q + k + head (q + k when sequential)
        assert len(widths) < len(calls) and max(widths) == (2 if opts.get("sequential") else 4)
        assert sum(rep.seconds for rep in rb.modules) <= rb.seconds


def test_batches_group_by_width_in_order_and_fit_the_budget():
    from obc_lightning.calibration import LayerHessian
    from obc_lightning.scheduling import COPIES_PER_GROUP, SolveSettings, _batches

    model = net()
    targets = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}

    def hessians():
        out = {}
        for n, m in targets.items():
            g = getattr(m, "groups", 1)
            d = m.weight[0].numel()
            out[n] = LayerHessian(n, torch.eye(d, dtype=torch.float64).expand(g, d, d), 1, 1)
        return out

    assert _batches(hessians(), targets, SolveSettings(), True) == [
        ["conv1"], ["conv2", "conv3"], ["gconv"], ["conv4"], ["fc1", "q", "k", "head"]]
    # half the budget holds the d x d copies of three 16-wide modules, not four; conv2 + conv3 do not fit
    budget = 2 * 3 * COPIES_PER_GROUP * 16 * 16 * 4
    assert _batches(hessians(), targets, SolveSettings(max_memory=budget), True) == [
        ["conv1"], ["conv2"], ["conv3"], ["gconv"], ["conv4"], ["fc1", "q", "k"], ["head"]]
    assert _batches(hessians(), targets, SolveSettings(), False) == [[n] for n in targets]
    assert _batches(hessians(), targets, SolveSettings(bits=None, sparsity=0.5), True) == [[n] for n in targets]
