"""Issue 31 item 4: packed Linears run torch's low-bit kernels where they serve (int4, int8), equal to the
exact dequantize path within the rounding bound of the arithmetic; the dequantize path is the default and
the fallback, and it never holds more than one module's dense weight."""

import copy
import pickle
import weakref

import pytest
import torch
from torch import nn

import obc_lightning.packed as packed_mod
from obc_lightning.formats.scalar import ScalarScheme
from obc_lightning.kernels.lowbit import INT4_MID, INT8_MID, rounding_bound
from obc_lightning.packed import QuantizedConv2d, QuantizedLinear, set_kernel


def random_linear(bits, group_size, rows=32, cols=256, symmetric=False, seed=0):
    """A QuantizedLinear with random codes, fp16 scales and zero points that include 0 and 2**bits - 1."""
    g = torch.Generator().manual_seed(seed)
    ng = 1 if group_size is None else -(-cols // group_size)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g)
    zeros = torch.randint(0, 2**bits, (rows, ng), generator=g)
    zeros[0], zeros[1] = 0, 2**bits - 1
    if symmetric:
        zeros[:] = 2 ** (bits - 1)
    scales = (torch.rand(rows, ng, generator=g) * 0.02 + 0.001).to(torch.float16)
    config = {"kind": "Linear", "scheme": "symmetric" if symmetric else "affine", "bits": bits,
              "group_size": group_size, "scale_dtype": "float16", "dtype": "float32"}
    tensors = ScalarScheme.pack(config, codes, scales, zeros)
    bias = torch.randn(rows, generator=g)
    return QuantizedLinear(cols, rows, config, tensors, bias)


def column_grids(m):
    """(codes, scales, zeros), each (out, in): every weight's code and grid."""
    codes = ScalarScheme.dense_codes(m.config, m.packed_tensors()).long()
    g = torch.arange(m.in_features) // (m.in_features if m.group_size is None else m.group_size)
    return codes, m.weight_scales.float()[:, g], m.weight_zeros.long()[:, g]


CASES = [  # bits, group_size, activation dtype, symmetric, the kernel expected where torch has it
    (4, 32, torch.float32, False, "int4"),
    (4, 128, torch.float32, False, "int4"),
    (3, None, torch.float32, False, "int4"),
    (2, 64, torch.float32, False, "int4"),
    (4, 64, torch.bfloat16, False, "int4"),
    (4, 64, torch.float16, False, "int4"),
    (8, None, torch.float32, False, "int8"),
    (8, None, torch.float32, True, "int8"),
    (6, None, torch.bfloat16, False, "int8"),
]


@pytest.mark.parametrize(("bits", "group_size", "dtype", "symmetric", "kernel"), CASES)
def test_kernel_path_equals_the_dequantize_path_within_the_rounding_bound(bits, group_size, dtype, symmetric, kernel):
    m = random_linear(bits, group_size, symmetric=symmetric).to(dtype)
    x = torch.randn(2, 3, m.in_features).to(dtype)
    with torch.no_grad():
        ref = m(x)  # kernel = "dequantize", the default
        m.kernel = "kernel"  # wherever one runs ("auto" skips the slow ones: float32 on CPU)
        path = m.kernel_path()
        if path.startswith("dequantize"):
            pytest.skip(f"no {kernel} kernel in this torch for {dtype} on CPU: {path}")
        assert m.lowbit_weight(x.device, dtype).kernel == kernel
        y = m(x)
    assert y.shape == ref.shape and y.dtype == dtype
    codes, s, z = column_grids(m)
    mid = INT4_MID if kernel == "int4" else INT8_MID
    x2, ref2 = x.reshape(-1, m.in_features), ref.reshape(-1, m.out_features)
    bound = rounding_bound(x2, codes, s, z, mid, dtype, ref2)
    diff = (y.reshape(ref2.shape).double() - ref2.double()).abs()
    assert bool((diff <= bound).all()), f"{path}: max excess {float((diff - bound).max())}"

    if dtype != torch.float32:
        return  # in half types the bound (a few output ulps) is wider than one grid step: nothing to show
    # in float32 the bound is tight enough to see a one-code error: the reference with one code moved by one step
    wrong = codes.clone()
    wrong[5, 7] += -1 if wrong[5, 7] > 0 else 1
    moved = ((x2.double() @ (s.double() * (wrong - z).double()).T) + m.bias.double()).to(dtype)
    assert not bool(((y.reshape(ref2.shape).double() - moved.double()).abs() <= bound).all())


def test_kernel_layouts_follow_the_buffers_device_moves_and_dtype_changes():
    m, new = random_linear(4, 64, seed=1), random_linear(4, 64, seed=2)
    m.kernel = "kernel"
    x = torch.randn(4, m.in_features)
    with torch.no_grad():
        if m.kernel_path().startswith("dequantize"):
            pytest.skip(f"no int4 kernel in this torch: {m.kernel_path()}")
        m(x)
        m.load_state_dict(new.state_dict())  # new codes: the held layout is rebuilt
        new_out = new(x)
        assert torch.allclose(m(x), new_out, rtol=0, atol=1e-4)
        clone = pickle.loads(pickle.dumps(m))  # the held layout (closures) is not part of the state
        assert clone._lowbit == {} and torch.equal(clone(x), m(x))
        assert torch.equal(copy.deepcopy(m)(x), m(x))
        m.double()  # no float64 kernel: the dequantize path, exact
        assert m.kernel_path().startswith("dequantize (no int4 kernel for float64")
        assert torch.equal(m(x.double()), new.double()(x.double()))


def test_what_no_kernel_serves_dequantizes_exactly_and_says_why():
    # a group of 16 (no int4 block divides it, no single grid per row for int8); 5 bits grouped; N:M-free
    # conv; activations in another dtype than the module; a gradient wanted
    small = random_linear(4, 16)
    grouped5 = random_linear(5, 64)
    paths = set_kernel(nn.Sequential(small, grouped5), "kernel")
    assert paths["0"].startswith("dequantize (int4 needs a block of 32, 64, 128 or 256 dividing group_size 16")
    assert "int8 needs one grid per row" in paths["0"] and "int8 needs one grid per row" in paths["1"]
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.equal(small(x), nn.functional.linear(x, small.weight, small.bias))
    assert small.kernel_path(dtype=torch.bfloat16).startswith("dequantize")

    served = random_linear(8, None)
    served.kernel = "kernel"
    assert "activations in bfloat16" in served.kernel_path(dtype=torch.bfloat16)
    xg = torch.randn(3, 256, requires_grad=True)
    out = served(xg)  # grad enabled and wanted: the dequantize path, differentiable
    assert torch.equal(out, nn.functional.linear(xg, served.weight, served.bias))
    out.sum().backward()
    assert xg.grad is not None and served.bias.grad is not None

    auto = random_linear(4, 64)
    auto.kernel = "auto"
    assert auto.kernel_path().startswith("dequantize (torch's low-bit kernels on cpu are slow with float32")
    with pytest.raises(ValueError, match=r"set_kernel: kernel must be one of \('dequantize', 'auto', 'kernel'\)"):
        set_kernel(served, "int4")
    conv = QuantizedConv2d.from_dense(
        nn.Conv2d(4, 16, 3), random_linear(4, None, rows=16, cols=36).config | {"kind": "Conv2d"},
        random_linear(4, None, rows=16, cols=36).packed_tensors(),
    )
    assert set_kernel(nn.Sequential(conv)) == {}


def test_the_dequantize_path_holds_one_dense_weight_at_a_time(monkeypatch):
    model = nn.Sequential(*(random_linear(4, 32, rows=64, cols=64, seed=i) for i in range(4)))
    alive: list[weakref.ref] = []
    held = []
    real = packed_mod.dequantize_packed

    def tracked(*args, **kwargs):
        held.append(sum(r() is not None for r in alive))  # dense weights still alive when the next is made
        w = real(*args, **kwargs)
        alive.append(weakref.ref(w))
        return w

    monkeypatch.setattr(packed_mod, "dequantize_packed", tracked)
    with torch.no_grad():
        model(torch.randn(2, 64))
    assert held == [0, 0, 0, 0]
    assert all(r() is None for r in alive)

    held.clear()
    if not set_kernel(model, "kernel")["0"].startswith("dequantize"):  # served by a kernel: no dense weight at all
        with torch.no_grad():
            model(torch.randn(2, 64))
        assert held == []
