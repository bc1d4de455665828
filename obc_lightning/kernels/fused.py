"""Host side of the fused solvers: per block of column steps one Triton launch and one batched matmul.

Each function is the torch loop of its solver with the per-column work moved into a kernel of
:mod:`obc_lightning.kernels.triton_kernels`; the bookkeeping between blocks (flushes, the shrinking working
set, deferred updates) is the same torch code as in the solver, so both paths take the same steps. No
value is read back to the host inside the loops: block boundaries depend on shapes only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from obc_lightning.kernels import LOG

# ExactOBC: columns per chunk of a row inside the kernel (registers stay bounded for any width)
OBC_CHUNK = 1024
# GPTQ / polish: rows per program (compiled); the interpreter's cost is per operation, so it takes up to 64
ROW_TILE = 16


def _row_tile(like: Tensor, rows: int) -> int:
    return ROW_TILE if like.device.type == "cuda" else min(_pow2(rows, 1), 64)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (n - 1).bit_length()))


def _launch(name: str, like: Tensor, grid: tuple[int, ...], *args, num_warps: int = 4, **meta) -> None:
    from obc_lightning.kernels import triton_kernels as tk

    interpret = like.device.type != "cuda"
    fn = tk.kernel(name, interpret)
    LOG.launches += 1
    LOG.in_launch = True
    try:
        if interpret:
            import numpy as np  # triton's dependency: the interpreter computes with numpy

            # masked lanes divide 0 by 0 before a where() discards them, as compiled code does silently
            with tk.interpreting(True), np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                fn[grid](*args, **meta)
        else:
            with torch.cuda.device(like.device):
                fn[grid](*args, num_warps=num_warps, **meta)
    finally:
        LOG.in_launch = False


def greedy_fast_fused(
    w: Tensor,
    hinv_src: Tensor,
    row_src: Tensor,
    scale: Tensor,
    zero: Tensor,
    maxq: int,
    block_size: int | None = None,
    blocks: int | None = None,
) -> tuple[Tensor, Tensor]:
    """ExactOBC as :func:`~obc_lightning.solvers.obc.greedy_fast` (same arguments, same result), each block
    of ``block_size`` steps one launch of ``obc_block``; flushes as in ``greedy_loop_fast``."""
    from obc_lightning.solvers.common import default_block_size
    from obc_lightning.solvers.obc import FlushBuffers, flush_live, symmetric_blocks

    R, d = w.shape
    dev, dt = w.device, w.dtype
    B = block_size or default_block_size(d)
    w = w.contiguous().clone()
    scale, zero = scale.contiguous().clone(), zero.contiguous().clone()
    outl = 0.25 * scale**2
    cols = torch.arange(d, device=dev).expand(R, d).contiguous()
    codes = torch.zeros(R, d, dtype=dt, device=dev)
    hinv_src = hinv_src.contiguous()
    row_src = row_src.contiguous()
    blocks = symmetric_blocks(dev) if blocks is None else blocks
    bufs = FlushBuffers()
    ar = torch.arange(R, device=dev)
    hf = None
    diag = hinv_src.diagonal(dim1=1, dim2=2)[row_src].contiguous()
    floor = (torch.finfo(dt).eps * diag.amax(dim=1)).clamp_min(torch.finfo(dt).tiny)
    broken = torch.zeros(R, dtype=torch.int8, device=dev)
    loss = torch.zeros(R, dtype=dt, device=dev)
    ut = torch.empty(R, B, d, dtype=dt, device=dev)
    done = torch.zeros(R, d, dtype=torch.int8, device=dev)
    n, step = d, 0
    if w.device.type == "cuda":  # a program per row, the row in chunks; U read 8 rows at a time
        br, chunk, bt = 1, OBC_CHUNK, 8
    else:  # the interpreter: its cost is per operation, so the largest tiles
        br, chunk, bt = min(_pow2(R, 1), 64), _pow2(d), _pow2(B)
    while step < d:
        steps = min(B, d - step)
        src, src_row = (hf, ar) if hf is not None else (hinv_src, row_src)
        _launch(
            "obc_block", w, (triton_cdiv(R, br),),
            w, diag, done, scale, zero, outl, cols, codes, src, src_row, ut, loss, broken, floor,
            R, n, d, steps, src.stride(0), src.stride(1), ut.stride(0), float(maxq),
            BLOCK_R=br, BLOCK=min(chunk, _pow2(n)), BLOCK_T=bt,
        )
        step += steps
        if steps < B or step == d:
            break
        # drop the B finished columns and flush the pending downdates into the live block (same
        # shapes for every row: each has finished B more weights)
        n2 = n - B
        keep = torch.argsort(done.to(torch.uint8), dim=1, stable=True)[:, :n2]
        uk = ut.gather(2, keep.unsqueeze(1).expand(R, B, n2))
        hf = flush_live(src, src_row, keep, uk, bufs, blocks)
        w, cols = w.gather(1, keep), cols.gather(1, keep)
        scale, zero, outl = scale.gather(1, keep), zero.gather(1, keep), outl.gather(1, keep)
        done = torch.zeros(R, n2, dtype=torch.int8, device=dev)
        ut = torch.empty(R, B, n2, dtype=dt, device=dev)
        n = n2
        diag = hf.diagonal(dim1=1, dim2=2).contiguous()  # resync the running diagonal with the matrix
    return codes, loss.masked_fill_(broken.bool(), float("nan"))


def gptq_blocks(W: Tensor, K: Tensor, s: Tensor, z: Tensor, fz: Tensor | None, U: Tensor, lid: Tensor | None,
                counts: list[int], maxq: int, block_size: int) -> None:
    """GPTQ's column loop on W (R, d; visiting order, updated in place), codes into K (R, d): per block
    one ``gptq_block`` launch and the deferred W[:, i2:] -= E U_l[block, i2:] as one matmul per layer.
    U (L, d, d): the layers' factors; lid (R,): each row's layer (None: one layer); counts: rows per layer."""
    from obc_lightning.solvers.common import row_bounds

    R, d = W.shape
    BB = _pow2(min(block_size, d))
    E = torch.empty(R, BB, dtype=W.dtype, device=W.device)
    s, z, U = s.contiguous(), z.contiguous(), U.contiguous()
    fz8 = fz.to(torch.int8).contiguous() if fz is not None else W
    lid = torch.zeros(R, dtype=torch.int64, device=W.device) if lid is None else lid.contiguous()
    br = _row_tile(W, R)
    grid = (triton_cdiv(R, br),)
    bounds = row_bounds(counts)
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        _launch(
            "gptq_block", W, grid,
            W, s, z, fz8, K, E, U, lid, R, i1, i2 - i1, W.stride(0), U.stride(0), U.stride(1), float(maxq),
            HAS_FZ=fz is not None, BLOCK_R=br, BLOCK_B=BB,
        )
        if i2 < d:
            for li, (a, b) in enumerate(bounds):
                W[a:b, i2:].addmm_(E[a:b, : i2 - i1], U[li, i1:i2, i2:], alpha=-1)


def polish_fused(
    w: Tensor, hessians: Tensor, lid: Tensor | None, counts: list[int], codes: Tensor, scale: Tensor, zero: Tensor,
    maxq: int, max_passes: int, block_size: int, frozen: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The passes of :func:`~obc_lightning.solvers.polish.polish_codes_layers` without host reads: every
    pass runs over all rows with the converged ones masked (a row that moved nothing stays put, as in the
    torch loop, which drops it). hessians (L, d, d), lid (R,) each row's layer (None: one layer), counts:
    rows per layer (stacked in order). Returns (codes, Q, passes run (0-d tensor), active rows (R,))."""
    from obc_lightning.grids import dequantize
    from obc_lightning.solvers.common import row_bounds

    R, d = w.shape
    K = codes.clone().contiguous()
    s, z = scale.contiguous(), zero.contiguous()
    Q = dequantize(K, s, z).contiguous()
    H = hessians.contiguous()
    hd = torch.diagonal(H, dim1=1, dim2=2).contiguous()  # (L, d)
    # 1 / H_jj and H_jj / 2 as the torch loop forms them (in double, then in the working dtype)
    inv_h = torch.where(hd > 0, 1.0 / hd.double(), torch.zeros((), dtype=torch.float64, device=hd.device))
    inv_h, half_h = inv_h.to(hd.dtype), (0.5 * hd.double()).to(hd.dtype)
    lid = torch.zeros(R, dtype=torch.int64, device=w.device) if lid is None else lid.contiguous()
    bounds = row_bounds(counts)
    fr = frozen.to(torch.int8).contiguous() if frozen is not None else K
    active = torch.ones(R, dtype=torch.int8, device=w.device)
    passes = torch.zeros((), dtype=torch.int64, device=w.device)
    BB = _pow2(min(block_size, d))
    D = torch.empty(R, BB, dtype=w.dtype, device=w.device)
    G = torch.empty_like(Q)
    br = _row_tile(w, R)
    grid = (triton_cdiv(R, br),)
    for _ in range(max_passes):
        passes += active.amax().to(torch.int64)
        for li, (a, b) in enumerate(bounds):  # gradient (q - w) H_l, exact at the start of each pass
            torch.mm(Q[a:b] - w[a:b], H[li], out=G[a:b])
        moved = torch.zeros(R, dtype=torch.int8, device=w.device)
        for i1 in range(0, d, block_size):
            i2 = min(i1 + block_size, d)
            _launch(
                "polish_block", w, grid,
                G, Q, K, s, z, fr, active, moved, H, hd, inv_h, half_h, D, lid,
                R, i1, i2 - i1, G.stride(0), H.stride(0), H.stride(1), hd.stride(0), float(maxq),
                HAS_FROZEN=frozen is not None, BLOCK_R=br, BLOCK_B=BB,
            )
            if i2 < d:
                for li, (a, b) in enumerate(bounds):  # deferred: g[:, i2:] += D H_l[block, i2:]
                    G[a:b, i2:].addmm_(D[a:b, : i2 - i1], H[li, i1:i2, i2:])
        active = active & moved
    return K, Q, passes, active


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
