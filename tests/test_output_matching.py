"""Output matching: cross moments from paired passes, the least-squares target W*, the objective against
the full-precision outputs, and compress_model(sequential=True, match_outputs=True) end to end."""

import copy
import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import obc_lightning.scheduling as scheduling
import obc_lightning.solvers.match as match_mod
from obc_lightning.calibration import MatchedHessian, collect_hessians, collect_matched
from obc_lightning.compress import compress_model
from obc_lightning.solvers.common import HessianDampingWarning
from obc_lightning.solvers.match import matched_objective, matched_weight
from obc_lightning.solvers.quantize import quantize_weight

F64 = torch.float64


def problem(N=200, d=6, rows=4, drift=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    Xt = X + drift * torch.randn(N, d, generator=g, dtype=torch.float64)
    W = torch.randn(rows, d, generator=g, dtype=torch.float64)
    Ht, C = 2 / N * Xt.T @ Xt, 2 / N * Xt.T @ X
    return X, Xt, W, Ht, C


def test_matched_weight_is_the_least_squares_solution():
    X, Xt, W, Ht, C = problem()
    Wstar, used = matched_weight(W, W @ C.T, Ht, damp=0.0)
    ref = torch.linalg.lstsq(Xt, X @ W.T).solution.T  # min_v ||X w - X̃ v||
    assert used == 0.0
    torch.testing.assert_close(Wstar, ref, rtol=1e-10, atol=1e-10)
    # damped: the ridge towards W, min ||X w - X̃ v||^2 2/N + lam ||v - w||^2, as an augmented lstsq
    lam_rel = 0.05
    lam = lam_rel * float(torch.diagonal(Ht).mean())
    N, d = X.shape
    s = (lam * N / 2) ** 0.5
    A = torch.cat([Xt, s * torch.eye(d, dtype=X.dtype)])
    ref = torch.stack([torch.linalg.lstsq(A, torch.cat([X @ w, s * w])).solution for w in W])
    torch.testing.assert_close(matched_weight(W, W @ C.T, Ht, damp=lam_rel)[0], ref, rtol=1e-10, atol=1e-10)
    # no drift (C = H̃): W* = W whatever the damping
    torch.testing.assert_close(matched_weight(W, W @ Ht, Ht, damp=0.01)[0], W, rtol=1e-12, atol=1e-12)


def test_matched_objective_is_the_output_error_against_full_precision():
    X, Xt, W, Ht, C = problem()
    N = X.shape[0]
    H = 2 / N * X.T @ X
    Q = W + 0.1 * torch.randn(W.shape, dtype=W.dtype)
    energy = ((W @ H) * W).sum(1)
    direct = 0.5 * 2 / N * ((X @ W.T - Xt @ Q.T) ** 2).sum(0)  # per row
    torch.testing.assert_close(matched_objective(Q, W @ C.T, energy, Ht), direct, rtol=1e-10, atol=1e-12)
    # undamped: = (the residual W* leaves) + 1/2 (w* - q) H̃ (w* - q)
    Wstar, _ = matched_weight(W, W @ C.T, Ht, damp=0.0)
    D = Wstar - Q
    split = matched_objective(Wstar, W @ C.T, energy, Ht) + 0.5 * ((D @ Ht) * D).sum(1)
    torch.testing.assert_close(split, direct, rtol=1e-9, atol=1e-12)
    assert bool((matched_objective(Wstar, W @ C.T, energy, Ht) <= direct).all())


def test_dead_inputs_and_pruned_weights():
    X, Xt, W, Ht, C = problem(d=7)
    Xt[:, 2] = 0  # dead in the compressed model: no information about its weight
    X[:, 4] = 0  # dead in full precision only: an ordinary regressor for the fit
    N = X.shape[0]
    Ht, C = 2 / N * Xt.T @ Xt, 2 / N * Xt.T @ X
    Wstar, _ = matched_weight(W, W @ C.T, Ht, damp=0.0)
    assert bool((Wstar[:, 2] == 0).all())
    keep = [i for i in range(7) if i != 2]
    ref = torch.linalg.lstsq(Xt[:, keep], X @ W.T).solution.T
    torch.testing.assert_close(Wstar[:, keep], ref, rtol=1e-9, atol=1e-10)
    # weights exactly 0 on live inputs (a pruned model) stay 0; the row is fitted on its kept inputs
    W[1, 0] = W[3, 5] = W[3, 6] = 0
    Wstar, _ = matched_weight(W, W @ C.T, Ht, damp=0.0)
    assert Wstar[1, 0] == 0 and Wstar[3, 5] == 0 and Wstar[3, 6] == 0
    for r, kept in [(1, [1, 3, 4, 5, 6]), (3, [0, 1, 3, 4]), (0, keep)]:
        ref = torch.linalg.lstsq(Xt[:, kept], X @ W[r]).solution
        torch.testing.assert_close(Wstar[r, kept], ref, rtol=1e-9, atol=1e-10)


def test_singular_hessian_escalates_damping_with_the_module_named():
    # H̃ exactly singular (inputs 0 and 1 identical) with small-integer entries: Cholesky's pivot for input
    # 1 is 4 - 2 * 2 = 0 exactly, whatever the CPU's rounding; C = H̃ (no drift) so W* = W
    Ht = 4 * torch.eye(6, dtype=torch.float64)
    Ht[0, 1] = Ht[1, 0] = 4
    W = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.warns(HessianDampingWarning, match="output matching of module 'blk.fc'.*used damp=1e-06"):
        Wstar, used = matched_weight(W, W @ Ht, Ht, damp=0.0, fn="compress_model", what="module 'blk.fc'")
    assert used == 1e-6 and torch.isfinite(Wstar).all()


def test_large_correction_is_announced():
    X, Xt, W, Ht, C = problem(N=7, d=6, drift=3.0)
    with pytest.warns(UserWarning, match="output matching of module 'x'.*moved the weights"):
        matched_weight(W, W @ C.T, Ht, damp=1e-9, what="module 'x'")


# ---------------------------------------------------------------------------------- calibration


class Fan(nn.Module):
    """a -> tanh -> (b: 3 rows of 8 inputs, output route; c: 8 x 8, covariance route) on one input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(5, 8), nn.Linear(8, 3), nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x).tanh()
        return self.b(h).sum(-1) + self.c(h).sum(-1)


class Convs(nn.Module):
    """conv -> tanh -> (gconv: groups 2, 2 rows of 18 inputs each, output route; wide: 1x1, 12 rows of 4
    inputs, covariance route)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.gconv = nn.Conv2d(4, 4, 3, groups=2, padding=1, padding_mode="reflect")
        self.wide = nn.Conv2d(4, 12, 1)

    def forward(self, x):
        h = self.conv(x).tanh()
        return self.gconv(h).mean() + self.wide(h).mean()


@contextmanager
def swapped(module, weight):
    saved = module.weight.detach().clone()
    module.weight.data.copy_(weight)
    try:
        yield
    finally:
        module.weight.data.copy_(saved)


def samples(module, x):
    """(groups, N, d) of a module's inputs, by F.unfold / flattening: the reference."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).unsqueeze(0)
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        pad = 0
    else:
        pad = module.padding
    P = F.unfold(x, module.kernel_size, padding=pad, stride=module.stride).transpose(1, 2)  # (B, L, C*k*k)
    P = P.reshape(-1, P.shape[-1])
    g = module.groups
    return P.reshape(P.shape[0], g, -1).transpose(0, 1)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_collect_matched_against_explicit_inputs(kind):
    model = (Fan() if kind == "linear" else Convs()).double()
    first, names = (model.a, ["b", "c"]) if kind == "linear" else (model.conv, ["gconv", "wide"])
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(3, 4, 5, generator=g, dtype=torch.float64)] * 2 if kind == "linear" else [
        torch.randn(2, 2, 5, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    original = first.weight.detach().clone()
    with torch.no_grad():
        first.weight.add_(0.2 * torch.randn(first.weight.shape, generator=g, dtype=torch.float64))
    mods = {n: model.get_submodule(n) for n in names}
    routes = {}
    res = collect_matched(model, xs, mods, full_precision=lambda: swapped(first, original))
    # reference: the inputs of each module in both models, by hooks on plain forwards
    for name, m in mods.items():
        ins = {}
        for tag, ctx in (("q", swapped(first, first.weight.detach())), ("f", swapped(first, original))):
            got = []
            h = m.register_forward_pre_hook(lambda mod, a, got=got: got.append(samples(mod, a[0])))
            with ctx, torch.no_grad():
                for x in xs:
                    model(x)
            h.remove()
            ins[tag] = torch.cat(got, dim=1)  # (g, N, d)
        Xt, X = ins["q"], ins["f"]
        N = X.shape[1]
        W = m.weight.detach().reshape(m.weight.shape[0], -1).reshape(X.shape[0], -1, X.shape[2])
        Ht = 2 / N * Xt.transpose(1, 2) @ Xt
        H = 2 / N * X.transpose(1, 2) @ X
        C = 2 / N * Xt.transpose(1, 2) @ X
        lh = res[name]
        assert isinstance(lh, MatchedHessian) and lh.drift and lh.n_samples == N
        torch.testing.assert_close(lh.hessians, Ht, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lh.cross, W @ C.transpose(1, 2), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lh.energy, ((W @ H) * W).sum(2), rtol=1e-10, atol=1e-12)
        acc_rows, d = W.shape[1], W.shape[2]
        routes[name] = 4 * acc_rows < 3 * d
    assert list(routes.values()) == [True, False]  # both routes exercised
    # H̃ is the plain Hessian of the compressed model, bit for bit
    plain = collect_hessians(model, xs, mods)
    for name in names:
        assert torch.equal(plain[name].hessians, res[name].hessians)


class Scaled(Fan):
    """Fan whose hidden state is multiplied by ``scale`` (2 in the "compressed" model, 1 in full precision)."""

    scale = 2.0

    def forward(self, x):
        h = self.a(x).tanh() * self.scale
        return self.b(h).sum(-1) + self.c(h).sum(-1)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_collect_matched_sampled_pairs_the_same_samples(fraction):
    """Drift by an exact factor 2 (X̃ = 2X): C = H̃/2 and diag(W H W^T) = diag(W H̃ W^T)/4 exactly, which
    holds only if both passes used the same drawn samples; H̃ equals plain (sampled) calibration's."""
    model = Scaled().double()
    xs = [torch.randn(4, 9, 5, dtype=torch.float64) for _ in range(3)]
    mods = {"b": model.b, "c": model.c}

    @contextmanager
    def full_precision():
        model.scale = 1.0
        try:
            yield
        finally:
            model.scale = 2.0

    res = collect_matched(model, xs, mods, full_precision=full_precision, sample_fraction=fraction, seed=5)
    plain = collect_hessians(model, xs, mods, sample_fraction=fraction, seed=5)
    for name, m in mods.items():
        lh, W = res[name], m.weight.detach().unsqueeze(0)
        assert torch.equal(lh.hessians, plain[name].hessians)
        torch.testing.assert_close(lh.cross, W @ lh.hessians / 2, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lh.energy, ((W @ lh.hessians) * W).sum(2) / 4, rtol=1e-10, atol=1e-12)


def test_collect_matched_reduce_fn_and_no_drift_flag():
    model = Fan().double()
    xs = [torch.randn(3, 4, 5, dtype=torch.float64)]
    mods = {"b": model.b, "c": model.c}

    @contextmanager
    def nothing():
        yield

    one = collect_matched(model, xs, mods, full_precision=nothing)
    assert not one["b"].drift and not one["c"].drift
    twice = collect_matched(model, xs, mods, full_precision=nothing, reduce_fn=lambda t: t.mul_(2))
    for name in mods:  # two identical ranks: the same H̃, cross moments and energies
        assert twice[name].n_samples == 2 * one[name].n_samples
        for f in ("hessians", "cross", "energy"):
            torch.testing.assert_close(getattr(twice[name], f), getattr(one[name], f), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------- compress_model


class Chain(nn.Module):
    """fc1 -> tanh -> fc2 (5 rows of 16) -> tanh -> fc3 (16 x 16), float64."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 16), nn.Linear(16, 5), nn.Linear(5, 16)

    def forward(self, x):
        return self.fc3(self.fc2(self.fc1(x).tanh()).tanh())


def chain_data():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(64, 16, generator=g, dtype=torch.float64) for _ in range(3)]


def test_compress_target_is_lstsq_and_loss_is_against_full_precision(monkeypatch):
    model, xs = Chain().double(), chain_data()
    fp = copy.deepcopy(model)
    targets = {}
    real = match_mod.matched_weight

    def spy(matrix, cross, hessian, damp=0.01, **kw):
        out = real(matrix, cross, hessian, damp, **kw)
        targets[kw["what"]] = out[0]
        return out

    monkeypatch.setattr(scheduling, "matched_weight", spy)
    rep = compress_model(model, xs, bits=3, sequential=True, match_outputs=True, damp=0.0, solver="gptq")
    assert rep.match_outputs and rep.calibration_passes == 5  # fc1 plain, then two passes each
    assert "losses against the full-precision outputs" in rep.table()
    assert list(targets) == ["module 'fc2'", "module 'fc3'"]
    X = torch.cat(xs)
    for name, prev in (("fc2", lambda m, x: m.fc1(x).tanh()), ("fc3", lambda m, x: m.fc2(m.fc1(x).tanh()).tanh())):
        with torch.no_grad():
            Xf, Xq = prev(fp, X), prev(model, X)
        W = fp.get_submodule(name).weight.detach()
        ref = torch.linalg.lstsq(Xq, Xf @ W.T).solution.T
        torch.testing.assert_close(targets[f"module '{name}'"], ref, rtol=1e-8, atol=1e-10)
        Q = model.get_submodule(name).weight.detach()
        N = X.shape[0]
        direct = 0.5 * 2 / N * float(((Xf @ W.T - Xq @ Q.T) ** 2).sum())
        at_target = 0.5 * 2 / N * float(((Xf @ W.T - Xq @ ref.T) ** 2).sum())
        assert rep[name].loss == pytest.approx(direct, rel=1e-9)
        assert rep[name].drift_loss == pytest.approx(at_target, rel=1e-7, abs=1e-12)
        assert rep[name].rel_error == pytest.approx(2 * direct / (2 / N * float(((Xf @ W.T) ** 2).sum())), rel=1e-9)
        assert rep.metrics()[f"obc/{name}/drift_loss"] == rep[name].drift_loss


def test_no_drift_gives_exactly_the_plain_result():
    xs = chain_data()
    # the first module, and a model whose earlier modules are excluded: nothing before them drifts
    for kw in ({}, {"exclude": "fc1"}):
        a, b = Chain().double(), Chain().double()
        ra = compress_model(a, xs, bits=3, sequential=True, match_outputs=True, **kw)
        rb = compress_model(b, xs, bits=3, sequential=True, **kw)
        first = "fc2" if kw else "fc1"
        assert torch.equal(a.get_submodule(first).weight, b.get_submodule(first).weight)
        assert ra[first].loss == rb[first].loss
    # a parallel branch after a compressed module: calibrated by paired passes, but without drift
    for fraction in (1.0, 0.5):
        models = []
        for match in (False, True):
            m = nn.ModuleDict({"p": nn.Linear(16, 16), "q": nn.Linear(16, 16)}).double()
            torch.manual_seed(0)
            m.p.reset_parameters()
            m.q.reset_parameters()
            m.forward = lambda x, m=m: m.p(x) + m.q(x.flip(-1))
            rep = compress_model(m, xs, bits=3, sequential=True, match_outputs=match, sample_fraction=fraction)
            models.append((m, rep))
        (plain, rp), (matched, rm) = models
        assert rm.calibration_passes == 3  # q had the paired passes
        assert torch.equal(plain.q.weight, matched.q.weight) and rp["q"].loss == rm["q"].loss
        assert rm["q"].drift_loss is None


def test_match_outputs_fits_the_full_precision_outputs_better():
    """fc2 sees the same drifted inputs in both runs (fc1 is compressed alike): with output matching
    its output error against the full-precision model is lower."""
    xs = chain_data()
    X = torch.cat(xs)
    errors = {}
    for match in (False, True):
        model, fp = Chain().double(), Chain().double()
        compress_model(model, xs, bits=8, sequential=True, match_outputs=match, include=["fc1", "fc2"])
        with torch.no_grad():
            errors[match] = float(((model.fc2(model.fc1(X).tanh()) - fp.fc2(fp.fc1(X).tanh())) ** 2).sum())
    assert errors[True] < 0.7 * errors[False]


@pytest.mark.parametrize(
    "kw",
    [
        {"solver": "obc"},
        {"solver": "gptq"},
        {"solver": "auto"},
        {"solver": "auto", "group_size": 8},
        {"n_m": (2, 4)},
        {"sparsity": 0.5},
        {"bits": None, "n_m": (2, 4)},
        {"method": "pq", "block_size": 4, "n_centroids": 4},
    ],
)
def test_every_solver_on_the_target(kw):
    """The target W* goes through every solver unchanged; the report's loss is the direct output error
    against the full-precision model, and pruning patterns survive."""
    kw = {"bits": 3, **kw}
    model, fp, xs = Chain().double(), Chain().double(), chain_data()
    if kw.get("method") == "pq":
        kw.pop("bits")
    with warnings.catch_warnings():
        warnings.simplefilter("error", HessianDampingWarning)  # no damping escalation here
        rep = compress_model(model, xs, sequential=True, match_outputs=True, include=["fc1", "fc2"], **kw)
    X = torch.cat(xs)
    with torch.no_grad():
        Xf, Xq = fp.fc1(X).tanh(), model.fc1(X).tanh()
    W, Q = fp.fc2.weight.detach(), model.fc2.weight.detach()
    direct = 0.5 * 2 / X.shape[0] * float(((Xf @ W.T - Xq @ Q.T) ** 2).sum())
    assert rep["fc2"].loss == pytest.approx(direct, rel=1e-9)
    assert rep["fc2"].drift_loss <= rep["fc2"].loss
    if "n_m" in kw:
        assert bool(((Q.reshape(5, -1, 4) != 0).sum(-1) <= 2).all())
    if "sparsity" in kw:
        assert rep["fc2"].sparsity == pytest.approx(0.5, abs=0.05)


def test_conv_model_and_grouped_convs_end_to_end():
    from test_compress import batches, tiny

    xs = batches(3)
    model, fp = tiny(), tiny()
    rep = compress_model(model, xs, bits=3, sequential=True, match_outputs=True, solver="obc")
    assert rep.quantized == ["conv", "gconv", "head"] and rep["conv"].drift_loss is None
    assert rep["gconv"].drift_loss is not None and rep["head"].drift_loss is not None
    # gconv's loss against the full-precision outputs, from explicit patches
    X = torch.cat(xs)
    with torch.no_grad():
        Xf, Xq = fp.conv(X).relu(), model.conv(X).relu()
        out_f = F.conv2d(Xf, fp.gconv.weight, groups=2)
        out_q = F.conv2d(Xq, model.gconv.weight, groups=2)
    N = out_f.shape[0] * out_f.shape[2] * out_f.shape[3]
    direct = 0.5 * 2 / N * float(((out_f - out_q) ** 2).sum())
    assert rep["gconv"].loss == pytest.approx(direct, rel=1e-4)


def test_output_matching_is_the_default_of_sequential():
    xs = chain_data()
    a, b, c = Chain().double(), Chain().double(), Chain().double()
    ra = compress_model(a, xs, bits=3, sequential=True)
    compress_model(b, xs, bits=3, sequential=True, match_outputs=True)
    rc = compress_model(c, xs, bits=3, sequential=True, match_outputs=False)
    assert ra.match_outputs and not rc.match_outputs and not compress_model(Chain().double(), xs, bits=3).match_outputs
    for n, p in a.named_parameters():
        assert torch.equal(p, dict(b.named_parameters())[n]), n
    assert not torch.equal(a.fc3.weight, c.fc3.weight)


def test_errors_name_compress_model_and_the_argument():
    from test_compress import batches, tiny

    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="compress_model: match_outputs=True needs sequential=True"):
        compress_model(model, batches(1), bits=4, match_outputs=True)
    with pytest.raises(ValueError, match="compress_model: match_outputs must be a bool"):
        compress_model(model, batches(1), bits=4, sequential=True, match_outputs="yes")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


class Flaky(nn.Module):
    """Calls ``b`` once or twice depending on how many forwards it has run: the passes differ."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.t = 0

    def forward(self, x):
        self.t += 1
        h = self.a(x)
        for _ in range(1 + self.t % 2):
            h = self.b(h)
        return h


def test_passes_that_call_a_module_differently_are_refused_and_the_model_restored():
    model = Flaky()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="compress_model: match_outputs pairs the inputs of module 'b'"):
        compress_model(model, [torch.randn(8, 4)], bits=4, sequential=True, match_outputs=True)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


class Noisy(nn.Module):
    """Draws random numbers in eval mode: both passes must draw the same ones."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.b(self.a(x) + torch.randn_like(x))


def test_randomness_inside_the_model_is_replayed():
    """b's full-precision and compressed inputs differ only through a's weights: with bits=8 (Q ~ W) the
    least-squares target stays close to W; had the noise differed between the passes, the paired inputs
    would decorrelate and W* would shrink towards 0."""
    model, fp = Noisy(), Noisy()
    torch.manual_seed(5)
    rep = compress_model(model, [torch.randn(256, 6)], bits=8, sequential=True, match_outputs=True, damp=0.0)
    assert rep["b"].drift_loss < 1e-3 * rep["b"].loss + 1e-4
    assert float((model.b.weight - fp.b.weight).norm() / fp.b.weight.norm()) < 0.05


def _ddp_rank(rank, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, xs = Chain().double(), chain_data()
        rep = compress_model(model, xs[rank::2], bits=3, sequential=True, match_outputs=True,
                             reduce_fn=dist.all_reduce)
        torch.save({"state": model.state_dict(), "loss": {m.name: m.loss for m in rep.modules}}, f"{out}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_all_reduce_the_cross_moments(tmp_path):
    """Two gloo ranks, each with its own batches: identical weights on both, and the same result as one
    process calibrating on all the batches (the sums are all-reduced, H̃ and the cross moments alike)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rank, args=(port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in (0, 1))
    for name, p in r0["state"].items():
        assert torch.equal(p, r1["state"][name]), name
    xs = chain_data()
    single = Chain().double()
    rep = compress_model(single, [xs[0], xs[2], xs[1]], bits=3, sequential=True, match_outputs=True)
    for name, p in single.state_dict().items():
        torch.testing.assert_close(r0["state"][name], p, rtol=0, atol=1e-9)
    for name, loss in r0["loss"].items():
        assert loss == pytest.approx(rep[name].loss, rel=1e-9)


class TiedAfter(nn.Module):
    """z -> a -> b -> c with a and b sharing one weight: both see inputs drifted by z's compression."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.z, self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(self.b(self.a(self.z(x).relu()).relu()).relu())


def test_tied_weight_is_fitted_to_the_summed_full_precision_outputs_of_its_users():
    model, xs = TiedAfter().double(), chain_data()
    fp = copy.deepcopy(model)
    rep = compress_model(model, xs, bits=3, sequential=True, damp=0.01, solver="gptq")
    assert model.b.weight is model.a.weight and rep["a"].tied == ("b",)
    X = torch.cat(xs)
    N, W = X.shape[0], fp.a.weight.detach()
    with torch.no_grad():
        zq = model.z(X).relu()  # a's and b's inputs as calibrated: z compressed, the shared weight not yet
        inputs = {"a": (fp.z(X).relu(), zq), "b": (fp.a(fp.z(X).relu()).relu(), fp.a(zq).relu())}
    # W* of the summed problem: (sum_u W C_u^T + lam W)(sum_u H̃_u + lam I)^-1, quantized on sum_u H̃_u
    G = sum(2 / N * W @ Xf.T @ Xq for Xf, Xq in inputs.values())
    Ht = sum(2 / N * Xq.T @ Xq for _, Xq in inputs.values())
    lam = 0.01 * float(torch.diagonal(Ht).mean())
    target = torch.linalg.solve(Ht + lam * torch.eye(16, dtype=F64), (G + lam * W).T).T
    expected = quantize_weight(target, Ht, 3, solver="gptq", damp=0.01, scale_dtype=torch.float16)
    torch.testing.assert_close(model.a.weight.detach(), expected.quantized_matrix, rtol=0, atol=1e-9)
    Q = model.a.weight.detach()
    for name, (Xf, Xq) in inputs.items():  # each user's own objective against its full-precision outputs
        direct = 0.5 * 2 / N * float(((Xf @ W.T - Xq @ Q.T) ** 2).sum())
        assert rep[name].loss == pytest.approx(direct, rel=1e-9)


def test_callback_takes_match_outputs(tmp_path):
    from obc_lightning import OBCQuantize

    cb = OBCQuantize(bits=3, sequential=True, match_outputs=False)
    assert cb.config.calibration.match_outputs is False and not cb.config.calibration.matches_outputs
    assert OBCQuantize(bits=3, sequential=True).config.calibration.matches_outputs
    with pytest.raises(ValueError, match=r"OBCQuantize: match_outputs=True needs sequential=True"):
        OBCQuantize(bits=3, match_outputs=True)


def test_recorded_inputs_past_the_memory_budget_are_refused_and_the_model_restored():
    model, xs = Chain().double(), chain_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # with offload the sums of fc2's pass need 3 x 16 x 16 float64 (6 KiB); its recorded inputs 3 x 64 x 16
    # float64 (24 KiB) do not fit 20 KB with them
    error = (r"compress_model: output matching keeps each module's inputs .* module 'fc2' they reached "
             r"\d+\.\d KiB on cpu with the sums, above the budget of 19\.5 KiB; use fewer calibration")
    with pytest.raises(MemoryError, match=error):
        compress_model(model, xs, bits=3, sequential=True, offload=True, max_memory=20_000)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    compress_model(model, xs, bits=3, sequential=True, offload=True, max_memory=40_000)  # both fit
