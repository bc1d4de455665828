"""The fused Triton kernels (run by Triton's interpreter on CPU) against the plain torch loops."""

import itertools

import pytest
import torch

pytest.importorskip("triton")

from obc_lightning import exact_obc, gptq, quantize_weight
from obc_lightning.grids import fit_grid
from obc_lightning.kernels import ENV, use_triton
from obc_lightning.kernels.counting import count_launches
from obc_lightning.solvers.polish import polish_codes


def problem(rows, cols, seed=0, dtype=torch.float64, samples=None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=dtype)
    X = torch.randn(samples or 4 * cols, cols, generator=g, dtype=dtype)
    X = X @ (torch.eye(cols, dtype=dtype) + 0.3 * torch.randn(cols, cols, generator=g, dtype=dtype))
    X = X * torch.exp(0.5 * torch.randn(cols, generator=g, dtype=dtype))
    return W, 2 * X.T @ X / X.shape[0]


def variant(W, H, kind):
    W, H = W.clone(), H.clone()
    cols = W.shape[1]
    if kind == "dead":
        dead = torch.arange(cols) % 5 == 1
        H[dead, :] = 0
        H[:, dead] = 0
    if kind == "pruned":
        W[torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) < 0.4] = 0
        W[0] = 0  # an all-pruned row
    return W, H


def both(monkeypatch, fn):
    monkeypatch.setenv(ENV, "torch")
    ref = fn()
    monkeypatch.setenv(ENV, "triton")
    with count_launches() as c:
        fused = fn()
    assert c.triton > 0  # the kernels ran
    return ref, fused


OPTS = [dict(), dict(symmetric=True), dict(group_size=8), dict(group_size=5, symmetric=True)]
CASES = list(itertools.product([(5, 13), (6, 32)], [2, 4], OPTS, ["plain", "dead", "pruned"]))


@pytest.mark.parametrize("shape,bits,opts,kind", CASES[::4])
def test_exact_obc_kernels_equal_torch_float64(shape, bits, opts, kind, monkeypatch):
    W, H = variant(*problem(*shape, seed=shape[1] + bits), kind)
    for block in (4, None):
        ref, fused = both(monkeypatch, lambda b=block: exact_obc(W, H, bits, block_size=b, **opts))
        assert torch.equal(fused.codes, ref.codes), (block, (fused.codes != ref.codes).sum())
        assert torch.allclose(fused.loss, ref.loss, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["plain", "pruned"])
def test_exact_obc_kernels_float32_total_loss(kind, monkeypatch):
    W, H = variant(*problem(8, 32, seed=4, dtype=torch.float32), kind)
    ref, fused = both(monkeypatch, lambda: exact_obc(W, H, 3, damp=0.01, block_size=8))
    assert abs(fused.loss.sum().item() / ref.loss.sum().item() - 1) < 1e-3


@pytest.mark.parametrize("act_order,opts", [(True, {}), (False, dict(group_size=8, symmetric=True))])
def test_gptq_kernels_equal_torch_float64(act_order, opts, monkeypatch):
    W, H = variant(*problem(6, 30, seed=7), "dead")
    # block_size 8 < d: several blocks, the deferred update between them
    ref, fused = both(monkeypatch, lambda: gptq(W, H, 3, act_order=act_order, block_size=8, **opts))
    assert torch.equal(fused.codes, ref.codes)


def test_gptq_kernels_frozen_weights(monkeypatch):
    from obc_lightning.solvers.gptq import gptq_codes

    W, H = variant(*problem(6, 30, seed=8), "pruned")
    H = H + 0.01 * torch.eye(30, dtype=H.dtype)
    grid = fit_grid(W, 3)
    s, z = grid.per_column()
    fz = W == 0
    ref, fused = both(monkeypatch, lambda: gptq_codes(W, H, s, z, grid.maxq, block_size=8, frozen=fz))
    assert torch.equal(fused, ref)
    assert torch.all(grid.dequantize(fused)[fz] == 0)


@pytest.mark.parametrize("frozen", [False, True])
def test_polish_kernels_equal_torch_float64(frozen, monkeypatch):
    W, H = variant(*problem(7, 24, seed=2), "plain")
    H[3, :] = 0  # a column with H_jj = 0: never moved
    H[:, 3] = 0
    grid = fit_grid(W, 3)
    s, z = grid.per_column()
    codes = torch.randint(0, grid.maxq + 1, W.shape, generator=torch.Generator().manual_seed(0)).double()
    fz = torch.rand(W.shape, generator=torch.Generator().manual_seed(5)) < 0.3 if frozen else None
    ref, fused = both(monkeypatch, lambda: polish_codes(W, H, codes, s, z, grid.maxq, max_passes=4, block_size=8,
                                                        frozen=fz))
    assert torch.equal(fused[0], ref[0]) and fused[1:] == ref[1:]
    if frozen:
        assert torch.equal(fused[0][fz], codes[fz])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_quantize_weight_auto_kernels(dtype, monkeypatch):
    W, H = variant(*problem(6, 32, seed=9, dtype=dtype), "pruned")
    ref, fused = both(monkeypatch, lambda: quantize_weight(W, H, 4, block_size=16))
    if dtype == torch.float64:
        assert torch.equal(fused.codes, ref.codes) and fused.solver_rows == ref.solver_rows
    else:
        assert abs(fused.loss.sum().item() / ref.loss.sum().item() - 1) < 1e-3
    assert torch.all(fused.quantized_matrix[W == 0] == 0)


def test_broken_rows_are_flagged_like_torch(monkeypatch):
    # an indefinite "inverse" for row 1: its pivots go non-positive, the row's loss must be NaN on both paths
    from obc_lightning.kernels.fused import greedy_fast_fused
    from obc_lightning.solvers.obc import greedy_fast

    W, H = problem(3, 12, seed=1)
    good = torch.linalg.inv(H)
    bad = good - 2 * torch.linalg.eigvalsh(good).max() * torch.outer(torch.ones(12), torch.ones(12)) / 12
    src = torch.stack([good, bad, good])
    grid = fit_grid(W, 4)
    s, z = grid.per_column()
    rows = torch.arange(3)
    monkeypatch.setenv(ENV, "triton")
    c1, l1 = greedy_fast_fused(W, src, rows, s, z, grid.maxq, 4)
    c0, l0 = greedy_fast(W, src, rows, s, z, grid.maxq, 4)
    assert torch.equal(torch.isnan(l1), torch.isnan(l0)) and bool(torch.isnan(l1[1]))
    assert torch.equal(c1[[0, 2]], c0[[0, 2]])


def test_kernel_switch(monkeypatch):
    t = torch.zeros(2)
    monkeypatch.delenv(ENV, raising=False)
    assert not use_triton(t)  # auto: CPU tensors take the torch loops
    monkeypatch.setenv(ENV, "torch")
    assert not use_triton(t)
    monkeypatch.setenv(ENV, "triton")
    assert use_triton(t)
    monkeypatch.setenv(ENV, "cuda")
    with pytest.raises(ValueError, match="OBC_LIGHTNING_KERNELS='cuda'"):
        exact_obc(torch.randn(2, 4), torch.eye(4))


def test_interpreter_switch_is_restored(monkeypatch):
    import os

    from obc_lightning.kernels import triton_kernels as tk

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with tk.interpreting(True):
        assert os.environ["TRITON_INTERPRET"] == "1"
    assert "TRITON_INTERPRET" not in os.environ
    assert type(tk.kernel("obc_block", True)).__name__ == "InterpretedFunction"
    assert type(tk.kernel("obc_block", False)).__name__ == "JITFunction"


# ATen ops + Triton launches per column step, whole call (grid fit, Hessian preparation and all):
# the targets for the fused path. Counts depend on shapes only, not on timing.
@pytest.mark.parametrize("solver,bound", [("exact_obc", 4), ("auto", 12)])
def test_fused_launches_per_column_step(solver, bound, monkeypatch):
    W, H = problem(4, 128, seed=0, dtype=torch.float32, samples=256)
    monkeypatch.setenv(ENV, "triton")
    with count_launches() as c:
        exact_obc(W, H, 4, damp=0.01) if solver == "exact_obc" else quantize_weight(W, H, 4)
    assert c.triton > 0
    assert c.total / W.shape[1] <= bound, (c.aten, c.triton)


F32 = {"obc_block": ("W DIAG DONE:i8 SCALE ZERO OUTL COLS:i64 CODES HF HF_ROW:i64 UT LOSS BROKEN:i8 FLOOR",
                     "R n d nsteps stride_hm stride_hr stride_ut", dict(BLOCK_R=1, BLOCK=1024, BLOCK_T=8)),
       "gptq_block": ("W S Z FZ:i8 K E U U_ROW:i64", "R i1 nb stride_w stride_ul stride_u",
                      dict(HAS_FZ=True, BLOCK_R=16, BLOCK_B=128)),
       "polish_block": ("G Q K S Z FROZEN:i8 ACTIVE:i8 MOVED:i8 H HD INV_H HALF_H D H_ROW:i64",
                        "R i1 nb stride_w stride_hl stride_h stride_dl",
                        dict(HAS_FROZEN=True, BLOCK_R=16, BLOCK_B=128))}


@pytest.mark.parametrize("name", sorted(F32))
def test_kernels_compile_for_sm90(name):
    # the interpreter accepts more than the compiler: compile for an H100/H200 (sm_90) with Triton's own
    # ptxas, no GPU needed
    import triton
    from triton.backends.compiler import GPUTarget

    from obc_lightning.kernels import triton_kernels as tk

    ptrs, ints, consts = F32[name]
    sig = {}
    for p in ptrs.split():
        arg, _, ty = p.partition(":")
        sig[arg] = f"*{ty or 'fp32'}"
    sig.update({i: "i32" for i in ints.split()})
    sig["maxq"] = "fp32"
    sig.update({c: "constexpr" for c in consts})
    fn = tk.kernel(name, False)
    src = triton.compiler.ASTSource(fn=fn, signature=sig,
                                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    assert "cubin" in compiled.asm
