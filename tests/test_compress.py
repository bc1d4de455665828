"""compress_model: in place, on the grid, include/exclude, sequential, report; errors restore the model."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import obc_lightning.scheduling as quantize_mod  # compress_model solves through this module's name
from obc_lightning.calibration import CalibrationWarning, collect_hessians
from obc_lightning.compress import compress_model, select_modules
from obc_lightning.export import read_metadata, save_quantized
from obc_lightning.packed import payload_nbytes
from obc_lightning.reporting import packed_weight_bytes


class Tiny(nn.Module):
    """Conv (3->4) -> grouped conv (4->4, groups=2) -> Linear(64 -> 5); forward(x, shift=None)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gconv = nn.Conv2d(4, 4, 3, groups=2)
        self.head = nn.Linear(64, 5)

    def forward(self, x, shift=None):
        if shift is not None:
            x = x + shift
        h = self.gconv(self.conv(x).relu()).relu()
        return self.head(h.flatten(1))


def tiny():
    torch.manual_seed(0)
    return Tiny()


def batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 6, 6, generator=g) for _ in range(n)]


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(model, before):
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("form", ["tensor", "tuple", "dict", "forward_fn"])
def test_in_place_on_grid_all_batch_forms(form):
    model = tiny()
    params = {n: p for n, p in model.named_parameters()}
    orig = weights(model)
    xs = batches()
    kw = {}
    if form == "tuple":
        xs = [(x, torch.zeros(())) for x in xs]
    elif form == "dict":
        xs = [{"x": x, "shift": torch.zeros(())} for x in xs]
    elif form == "forward_fn":
        xs = [{"images": x} for x in xs]
        kw["forward_fn"] = lambda m, b: m(b["images"])
    report = compress_model(model, iter(xs), bits=3, keep_results=True, **kw)  # a one-shot iterator too

    assert report.quantized == ["conv", "gconv", "head"] and not report.skipped
    for n, p in model.named_parameters():
        assert p is params[n] and p.dtype == torch.float32  # in place: same Parameter, same dtype
        if n.endswith("bias"):
            assert torch.equal(p, orig[n])  # biases untouched
        else:
            assert not torch.equal(p, orig[n])
    for name, results in report.results.items():
        w = model.get_submodule(name).weight
        # every weight is exactly the dequantized code of its grid
        deq = torch.cat([r.grid.dequantize(r.codes) for r in results]).reshape(w.shape)
        assert torch.equal(deq, w.detach()), name
        assert all(int(r.codes.min()) >= 0 and int(r.codes.max()) <= 7 for r in results)
    assert len(report.results["gconv"]) == 2  # one solve per conv group


def test_report_loss_and_rel_error_match_direct_outputs():
    model = tiny()
    ref = copy.deepcopy(model)
    xs = batches()
    H = collect_hessians(ref, xs, {"head": ref.head})["head"].hessians[0]
    acts = []
    h = ref.head.register_forward_hook(lambda m, a, o: acts.append(a[0]))
    with torch.no_grad():
        for x in xs:
            ref(x)
    h.remove()
    report = compress_model(model, xs, bits=2)
    X = torch.cat(acts).double()  # (N, 64)
    dW = (model.head.weight - ref.head.weight).double().detach()
    W = ref.head.weight.double().detach()
    # rel_error = ||(W - Q) X||^2 / ||W X||^2; loss = 1/N ||(W - Q) X||^2 = 1/2 tr(dW H dW^T)
    r = report["head"]
    assert r.rel_error == pytest.approx(float((X @ dW.T).square().sum() / (X @ W.T).square().sum()), rel=1e-4)
    assert r.loss == pytest.approx(float((X @ dW.T).square().sum()) / X.shape[0], rel=1e-4)
    assert r.loss == pytest.approx(0.5 * float(((dW @ H) * dW).sum()), rel=1e-4)
    assert r.obc_rows + r.gptq_rows == 5 and r.n_samples == 12


def test_sizes_and_table():
    model = tiny()
    report = compress_model(model, batches(1), bits=4, group_size=8, solver="obc")
    n_params = sum(p.numel() for p in model.parameters())
    assert report.bytes_before == 4 * n_params
    head = report["head"]
    assert head.bytes_after == packed_weight_bytes(5 * 64, 5, 8, 4) + 4 * 5  # 64 cols / 8 = 8 groups
    assert report.bytes_after == sum(m.bytes_after for m in report.modules)
    assert report.compression_ratio == pytest.approx(report.bytes_before / report.bytes_after)
    n_w = sum(m.weight.numel() for m in (model.conv, model.gconv, model.head))
    n_scales = 4 * 4 + 4 * 3 + 5 * 8  # rows x groups: conv 27 cols, gconv 18 cols (ceil / 8)
    assert report.avg_bits == pytest.approx((4 * n_w + 24 * n_scales) / n_w)  # fp16 scale + uint8 zero
    table = report.table()
    assert str(report) == table
    for token in ("conv", "gconv", "head", "Conv2d[g=2]", "rel_err", "4/g8", "bits/weight"):
        assert token in table
    assert compress_model(tiny(), batches(1), bits=4, group_size=32, solver="obc")["conv"].group_size is None
    m = report.metrics()
    assert m["obc/head/rel_error"] == head.rel_error and m["obc/head/obc_rows"] == 5
    assert {"obc/size_mb_before", "obc/size_mb_after", "obc/compression_ratio", "obc/avg_bits"} <= set(m)


def test_include_exclude_patterns():
    model = tiny()
    assert list(select_modules(model, include="*conv")) == ["conv", "gconv"]
    assert list(select_modules(model, exclude=["head", "g*"])) == ["conv"]
    orig = weights(model)
    report = compress_model(model, batches(1), bits=4, include=["conv", "head"], solver="obc")
    assert report.quantized == ["conv", "head"]
    assert torch.equal(model.gconv.weight, orig["gconv.weight"])
    seq = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 2))
    assert list(select_modules(seq, include="0")) == ["0.0", "0.1"]  # a parent selects its children


def test_sequential_uses_inputs_of_quantized_earlier_modules():
    xs = batches()
    seq_model, plain_model = tiny(), tiny()
    # match_outputs=False: each module fitted to its own outputs on the drifted inputs, which is what
    # one compress_model call per module does (the default, output matching, is tested in test_output_matching)
    seq = compress_model(seq_model, xs, bits=2, sequential=True, solver="obc", match_outputs=False)
    plain = compress_model(plain_model, xs, bits=2, sequential=False, solver="obc")
    assert seq.quantized == plain.quantized == ["conv", "gconv", "head"]
    assert torch.equal(seq_model.conv.weight, plain_model.conv.weight)  # first module: same inputs
    assert not torch.equal(seq_model.head.weight, plain_model.head.weight)
    # sequential == quantize conv, then calibrate gconv on the quantized conv, then head
    manual = tiny()
    for name in ["conv", "gconv", "head"]:
        compress_model(manual, xs, bits=2, include=name, solver="obc")
    for n, p in manual.named_parameters():
        assert torch.equal(p, dict(seq_model.named_parameters())[n]), n


class SharedInput(nn.Module):
    """q, k, v on one hidden state (one calibration pass), then o on their result; with ``inplace`` the
    hidden state is changed in place between k and v (v's input then depends on k: no shared pass)."""

    def __init__(self, inplace=False):
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.inplace = nn.LayerNorm(12), inplace
        self.q, self.k, self.v, self.o = (nn.Linear(12, 12) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        q, k = self.q(h), self.k(h)
        if self.inplace:
            h.add_(k)
        v = self.v(h)
        return self.o(torch.softmax(q @ k.transpose(1, 2), -1) @ v)


def test_sequential_shares_a_pass_between_modules_on_the_same_input_and_matches_one_by_one():
    from obc_lightning.compress import execution_groups

    xs = [torch.randn(4, 6, 12) for _ in range(3)]
    for inplace, groups in [(False, [["q", "k", "v"], ["o"]]), (True, [["q", "k"], ["v"], ["o"]])]:
        model = SharedInput(inplace)
        assert execution_groups(model, xs[0], select_modules(model)) == groups
    # equal values in another tensor object are not the same input: no sharing
    model = nn.Sequential(nn.Linear(5, 5), nn.Identity(), nn.Linear(5, 5))
    model[1].forward = lambda x: x.clone()
    assert execution_groups(model, torch.randn(2, 5), select_modules(model)) == [["0"], ["2"]]

    for inplace in (False, True):
        grouped, manual = SharedInput(inplace), SharedInput(inplace)
        report = compress_model(grouped, xs, bits=3, sequential=True, solver="gptq", match_outputs=False)
        assert report.calibration_passes == (3 if inplace else 2)
        for name in ["q", "k", "v", "o"]:  # one module at a time, each on the already quantized ones
            compress_model(manual, xs, bits=3, include=name, solver="gptq")
        for n, p in manual.named_parameters():
            assert torch.equal(p, dict(grouped.named_parameters())[n]), (inplace, n)


def test_sequential_under_ddp_refuses_ranks_that_found_different_orders():
    from obc_lightning.compress import _check_same_groups

    targets = {n: nn.Linear(2, 2) for n in "abcd"}

    def ranks(*others):  # reduce_fn of a run whose other ranks found these groups: the sums over all
        def reduce_fn(t):
            for groups in others:
                where = {n: (g, i) for g, grp in enumerate(groups) for i, n in enumerate(grp)}
                codes = torch.tensor([where[n] for n in targets], dtype=torch.float64).flatten()
                t += torch.cat([codes, codes.square(), torch.ones(1, dtype=torch.float64)])

        return reduce_fn

    mine = [["a", "b"], ["c"], ["d"]]
    _check_same_groups(mine, targets, ranks(mine, mine))  # three ranks agree
    for others in ([[["a"], ["b"], ["c"], ["d"]]], [[["b", "a"], ["c"], ["d"]]], [mine, [["a", "b"], ["d"], ["c"]]]):
        with pytest.raises(ValueError, match="same order of modules on every rank"):
            _check_same_groups(mine, targets, ranks(*others))
    # three ranks whose codes sum to three times the first rank's (d is in group 1, 2, 0 and at place 1,
    # 0, 2): a test on the sums alone would pass them, the squares tell them apart
    first, second, third = [["a", "b"], ["c", "d"]], [["a", "b"], ["c"], ["d"]], [["a", "b", "d"], ["c"]]
    with pytest.raises(ValueError, match="same order"):
        _check_same_groups(first, targets, ranks(second, third))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 9}, "compress_model: bits must be"),
        ({"bits": 1}, "compress_model: bits must be"),
        ({"solver": "magic"}, "solver"),
        ({"group_size": 0}, "group_size"),
        ({"damp": -1.0}, "damp"),
        ({"include": "typo*"}, "include pattern 'typo\\*' matches no"),
        ({"exclude": "nope"}, "exclude pattern 'nope'"),
        ({"include": "head", "exclude": "head"}, "leave no module"),
        ({"calibration_batches": []}, "empty"),
        ({"calibration_batches": torch.randn(2, 3, 6, 6)}, "single tensor"),
        ({"product_dtype": torch.float16}, "compress_model: product_dtype must be"),
    ],
)
def test_bad_arguments_leave_model_intact(kwargs, match):
    model = tiny()
    orig = weights(model)
    kwargs = {"calibration_batches": batches(1), **kwargs}
    with pytest.raises(ValueError, match=match):
        compress_model(model, **kwargs)
    assert_same(model, orig)


@pytest.mark.parametrize("sequential", [False, True])
def test_solver_failure_restores_weights(monkeypatch, sequential):
    model = tiny()
    model.train()
    orig = weights(model)
    real = quantize_mod.quantize_weights
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # conv (its own width) is solved and written; gconv's two groups fail
            raise RuntimeError("solver exploded")
        return real(*args, **kwargs)

    monkeypatch.setattr(quantize_mod, "quantize_weights", flaky)
    with pytest.raises(RuntimeError, match="solver exploded"):
        compress_model(model, batches(1), bits=4, sequential=sequential, solver="obc")
    assert_same(model, orig)
    assert model.training


def test_nan_activations_leave_model_intact():
    model = tiny()
    orig = weights(model)
    bad = batches(2)
    bad[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="module 'conv'.*NaN"):
        compress_model(model, bad, bits=4, sequential=True, solver="obc")
    assert_same(model, orig)


@pytest.mark.parametrize("sequential", [False, True])
def test_transformer_encoder_every_linear_quantized_in_proj_named(tmp_path, sequential):
    from obc_lightning import load_quantized

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(8, 3))
    model.eval()  # eval + no_grad is where the fused fast path would bypass the Linear modules
    fresh = copy.deepcopy(model)
    orig = weights(model)
    xs = [torch.randn(2, 4, 8) for _ in range(2)]
    with pytest.warns(CalibrationWarning, match="2 layer weight.s. left in full precision") as caught:
        report = compress_model(model, xs, bits=4, sequential=sequential, keep_results=True)
    assert len(caught) == 1  # every Linear got its Hessian; only the q, k, v projections are named
    in_proj = [f"0.layers.{i}.self_attn.in_proj_weight" for i in range(2)]
    assert list(report.skipped) == in_proj
    assert "nn.MultiheadAttention '0.layers.1.self_attn'" in report.skipped[in_proj[1]]
    assert "in_proj_weight" in str(caught[0].message) and "full precision" in report.table()
    # the sizes cover the projections at fp32 on both sides: every Linear and attention weight and bias
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    attns = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    linear_bytes = 4 * sum(m.weight.numel() + m.bias.numel() for m in linears)
    in_proj_bytes = 4 * sum(a.in_proj_weight.numel() + a.in_proj_bias.numel() for a in attns)
    assert report.bytes_before == linear_bytes + in_proj_bytes
    assert report.bytes_after == sum(r.bytes_after for r in report.modules) + in_proj_bytes
    per_layer = ["self_attn.out_proj", "linear1", "linear2"]  # the order the layer uses them
    assert report.quantized == [f"0.layers.{i}.{n}" for i in range(2) for n in per_layer] + ["1"]
    for name in report.quantized:
        w = dict(model.named_parameters())[name + ".weight"]
        assert not torch.equal(w, orig[name + ".weight"]), name
        assert len(torch.unique(w[0])) <= 16, name  # 4 bits: at most 16 levels per row
    assert report["0.layers.0.self_attn.out_proj"].rel_error < 0.05
    assert not model.training  # mode kept
    # packed: out_proj becomes a QuantizedLinear that the attention reads .weight / .bias of
    save_quantized(model, tmp_path / "m.safetensors", report)
    load_quantized(tmp_path / "m.safetensors", fresh, packed=True)
    assert type(fresh[0].layers[0].self_attn.out_proj).__name__ == "QuantizedLinear"
    with torch.no_grad():
        torch.testing.assert_close(fresh(xs[0]), model(xs[0]), rtol=0, atol=0)


def test_attention_projections_selected_like_modules():
    """include / exclude select the q, k, v projection weights by name, attention or parent; the
    separate q/k/v layout (kdim, vdim != embed_dim) is named weight by weight, with its bias rows."""
    torch.manual_seed(0)

    class TwoAttn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.MultiheadAttention(8, 2, batch_first=True)
            self.b = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x, kv):
            x = self.a(x, x, x, need_weights=False)[0]
            return self.head(self.b(x, kv[..., :6], kv[..., :5], need_weights=False)[0])

    batches = [(torch.randn(2, 4, 8), torch.randn(2, 3, 6)) for _ in range(2)]
    with pytest.warns(CalibrationWarning, match="4 layer weight"):
        report = compress_model(TwoAttn(), batches, bits=4)
    assert list(report.skipped) == ["a.in_proj_weight", "b.q_proj_weight", "b.k_proj_weight", "b.v_proj_weight"]
    assert report.quantized == ["a.out_proj", "b.out_proj", "head"]
    sizes = {"a.in_proj_weight": 24 * 8 + 24, "b.q_proj_weight": 8 * 8 + 8, "b.k_proj_weight": 8 * 6 + 8,
             "b.v_proj_weight": 8 * 5 + 8}
    fp32 = 4 * sum(sizes.values())
    assert report.bytes_before - report.bytes_after == sum(r.bytes_before - r.bytes_after for r in report.modules)
    assert report.bytes_before == fp32 + sum(r.bytes_before for r in report.modules)

    with pytest.warns(CalibrationWarning, match="3 layer weight"):
        report = compress_model(TwoAttn(), batches, bits=4, include="b")
    assert list(report.skipped) == ["b.q_proj_weight", "b.k_proj_weight", "b.v_proj_weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        report = compress_model(TwoAttn(), batches, bits=4, exclude=["*_proj_weight"])
    assert not report.skipped and report.quantized == ["a.out_proj", "b.out_proj", "head"]
    with pytest.raises(ValueError, match="exclude pattern 'a.in_proj'"):
        compress_model(TwoAttn(), batches, bits=4, exclude="a.in_proj")  # a typo still fails


def test_float64_and_no_warning_when_all_calibrated():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        report = compress_model(model, [torch.randn(8, 6, dtype=torch.float64)], bits=8, solver="obc")
    assert model[0].weight.dtype == torch.float64 and report.quantized == ["0", "2"]
    assert report["0"].rel_error < 1e-3


# --- joint pruning (OBS) and quantization -----------------------------------------------------------


def test_prune_then_quantize_unstructured():
    model = tiny()
    report = compress_model(model, batches(), bits=4, sparsity=0.5, solver="obc")
    for name, m in (("conv", model.conv), ("gconv", model.gconv), ("head", model.head)):
        rep = report[name]
        assert rep.sparsity == pytest.approx(0.5, abs=0.02)
        # pruned weights stay exactly 0 through quantization (more may round to 0 on the grid)
        assert (m.weight == 0).sum() >= round(rep.sparsity * m.weight.numel())
    n_w = sum(m.weight.numel() for m in (model.conv, model.gconv, model.head))
    assert report.sparsity == pytest.approx(sum(r.sparsity * math.prod(r.shape) for r in report.modules) / n_w)
    assert "pruned" in report.table() and report.metrics()["obc/sparsity"] == report.sparsity
    # the loss is measured against the original weights: pruning + quantization costs more than quantization
    plain = compress_model(tiny(), batches(), bits=4, solver="obc")
    assert report["head"].loss > plain["head"].loss and plain.sparsity == 0 and "obc/sparsity" not in plain.metrics()


def test_prune_only_and_nm_on_linear_and_conv_channels(tmp_path):
    model = tiny()
    orig = weights(model)
    report = compress_model(model, batches(), bits=None, n_m=(2, 4), include="head")
    W = model.head.weight
    assert ((W != 0).view(5, 16, 4).sum(dim=2) <= 2).all()  # dead inputs (always 0) count as pruned
    assert report["head"].sparsity >= 0.5
    # the reported size is that of the file save_quantized writes: 2 float16 values of every 4 inputs
    # and their 2-bit positions (9 bits per weight), the rest of the model as it is
    assert report["head"].bytes_after == report["head"].bytes_before - 5 * 64 * 4 + 5 * 64 * 9 // 8
    assert report["head"].bytes_after == stored_bytes(model, report, tmp_path / "nm.safetensors", n_m=(2, 4))["head"]
    assert not torch.equal(W[W != 0], orig["head.weight"][W != 0])  # kept weights were compensated
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    rep = compress_model(net, batches(), bits=4, n_m=(2, 4), include="2", solver="obc", keep_results=True)
    nz = (net[2].weight != 0).view(4, 2, 4, 3, 3).sum(dim=2)  # input channels in groups of 4, per kernel position
    assert (nz <= 2).all() and rep["2"].sparsity >= 0.5
    assert rep["2"].bytes_after == stored_bytes(net, rep, tmp_path / "joint.safetensors", n_m=(2, 4))["2"]


def test_unstructured_prune_only_size_is_the_bitmask_file(tmp_path):
    model = tiny()
    report = compress_model(model, batches(), bits=None, sparsity=0.5)
    stored = stored_bytes(model, report, tmp_path / "u.safetensors")
    assert {r.name: r.bytes_after for r in report.modules} == stored
    assert report.bytes_after == sum(stored.values()) < report.bytes_before


def stored_bytes(model, report, path, **save_kw) -> dict[str, int]:
    """Bytes each compressed module takes in the file save_quantized writes: packed payload + bias."""
    save_quantized(model, path, report, **save_kw)
    configs = read_metadata(path)
    modules = dict(model.named_modules())
    return {n: payload_nbytes(configs[n]) + modules[n].bias.numel() * 4 for n in (r.name for r in report.modules)}


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(bits=None), "needs sparsity"),
        (dict(sparsity=0.5, n_m=(2, 4)), "at most one"),
        (dict(sparsity=1.5), r"\[0, 1\)"),
        (dict(n_m=(4, 4)), "N < M"),
        (dict(n_m=(2, 4)), "divide the input channels"),  # conv has 3 input channels
    ],
)
def test_prune_arguments_checked_before_touching_the_model(kw, match):
    model = tiny()
    orig = weights(model)
    with pytest.raises(ValueError, match=match):
        compress_model(model, batches(1), **kw)
    assert_same(model, orig)
