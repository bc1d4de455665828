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



def test_exact_obc_kernels_symmetric_flush_float64(monkeypatch):
    # the flush's lower block triangle and its mirror (the CUDA default) against the one-step loop
    import obc_lightning.solvers.obc as obc

    W, H = variant(*problem(5, 32, seed=3), "pruned")
    ref = exact_obc(W, H, 3, method="reference")
    monkeypatch.setattr(obc, "symmetric_blocks", lambda device: 3)
    monkeypatch.setenv(ENV, "triton")
    fused = exact_obc(W, H, 3, block_size=4)
    assert torch.equal(fused.codes, ref.codes)

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


# Column c of a d-column layer sits c * d elements into U (GPTQ) or H (polish): past 2^31 once
# d > 46,340. One block of columns at the end of a 46,352-column layer must give what the same block
# gives as a layer of its own. The big matrix is allocated but never filled (only the block's rows
# are written: the pages touched are those rows), so this needs 8 GiB of address space, not of memory.
BIG_D, NB = 46352, 16


def _big(numel):
    try:
        return torch.empty(numel, dtype=torch.float32)
    except RuntimeError:  # the OS refuses the address space
        pytest.skip("no 8 GiB of address space for the 46,352-column layer")


def _block_problem(d, i1, mat):
    """(R=2, d) tensors with the block's values at columns i1 .. i1 + NB; mat (1, d, d): its block rows."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, NB, generator=g)
    a = torch.randn(NB, NB, generator=g)
    block = torch.triu(a @ a.T / NB + torch.eye(NB))  # an upper factor (GPTQ) / a symmetric H's rows (polish)
    cols = slice(i1, i1 + NB)
    W = torch.zeros(2, d)
    W[:, cols] = w
    S, Z = torch.full((2, d), 0.3), torch.full((2, d), 7.0)
    for r in range(NB):
        mat[0, i1 + r, cols] = block[r] + block[:, r] - torch.diag(block)[r] * (torch.arange(NB) == r)
    return W, S, Z


@pytest.mark.parametrize("name", ["gptq_block", "polish_block"])
def test_kernel_addresses_past_two_to_the_31(name):
    from obc_lightning.kernels.fused import _launch

    out = {}
    for d, i1 in ((NB, 0), (BIG_D, BIG_D - NB)):
        mat = (_big(d * d) if d == BIG_D else torch.zeros(d * d)).view(1, d, d)
        assert (i1 + NB - 1) * d + i1 + NB > 2**31 or d == NB
        W, S, Z = _block_problem(d, i1, mat)
        K = torch.zeros(2, d)
        D = torch.zeros(2, NB)
        lid = torch.zeros(2, dtype=torch.int64)
        if name == "gptq_block":
            _launch(name, W, (1,), W, S, Z, W, K, D, mat, lid, 2, i1, NB, d, d * d, d, 15.0,
                    HAS_FZ=False, BLOCK_R=2, BLOCK_B=NB)
            out[d] = (K[:, i1:], D, W[:, i1:])
        else:
            hd = torch.zeros(1, d)
            hd[0, i1:] = mat[0, torch.arange(i1, i1 + NB), torch.arange(i1, i1 + NB)]
            inv_h, half_h = torch.where(hd > 0, 1 / hd, 0.0), hd / 2
            Q = torch.zeros(2, d)
            act, moved = torch.ones(2, dtype=torch.int8), torch.zeros(2, dtype=torch.int8)
            _launch(name, W, (1,), W, Q, K, S, Z, K, act, moved, mat, hd, inv_h, half_h, D, lid,
                    2, i1, NB, d, d * d, d, d, 15.0, HAS_FROZEN=False, BLOCK_R=2, BLOCK_B=NB)
            out[d] = (K[:, i1:], D, W[:, i1:], Q[:, i1:])
        del mat
    assert bool(out[NB][1].abs().sum() > 0)  # the block did something
    for small, big in zip(out[NB], out[BIG_D]):
        assert torch.equal(small, big)
