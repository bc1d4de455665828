"""The Triton kernels: one launch runs a whole block of column steps (imported only when used).

Every kernel mirrors, operation for operation, the torch loop it replaces (same formulas in the same
order, round half to even, first index on ties), so that in float64 the codes are identical to the
torch path's; see :mod:`obc_lightning.kernels.fused` for the host side.

Each kernel exists twice: compiled (CUDA tensors) and interpreted (CPU tensors). Triton decides which at
decoration time from ``TRITON_INTERPRET`` (``triton.knobs.runtime.interpret`` from 3.4 on), so
:func:`kernel` decorates the plain functions below with that switch set explicitly either way, and
interpreted launches run with it set too (some interpreter paths read it at run time).

``triton.language``'s own jitted helpers (``tl.min``, ``tl.argmin``, ``tl.sum``, ...) are decorated once,
when ``triton.language`` is first imported, in whatever mode was set then; called from a kernel of the
other mode they fail ("Cannot call @triton.jit'd outside of the scope of a kernel"). So the kernels use
builtins only, and reductions as ``tl.reduce`` with the standard combine functions, which both modes
accept (the interpreter maps those to numpy by identity and never calls them): one process can run
compiled kernels on CUDA tensors and interpreted ones on CPU tensors, whatever TRITON_INTERPRET was at
import.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import triton
import triton.language as tl


def _rint(x):
    # round half to even (torch.round) from floor: x - floor(x) is exact, so the tie test is exact
    f = tl.floor(x)
    r = x - f
    odd = f - 2.0 * tl.floor(f * 0.5)  # 1 if f is odd, else 0
    return tl.where(r > 0.5, f + 1.0, tl.where(r < 0.5, f, f + odd))


def _clamp(x, hi):
    # torch.clamp(x, 0, hi) with NaN kept (a NaN only appears in a broken row, which is re-solved)
    return tl.where(x < 0.0, 0.0, tl.where(x > hi, hi, x))


def obc_block(
    W, DIAG, DONE, SCALE, ZERO, OUTL, COLS, CODES, HF, HF_ROW, UT, LOSS, BROKEN, FLOOR,
    R, n, d, nsteps, stride_hm, stride_hr, stride_ut, maxq,
    BLOCK_R: tl.constexpr, BLOCK: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """``nsteps`` greedy ExactOBC steps of a tile of BLOCK_R rows, H^-1 = H_f - U U^T with U growing.

    W, DIAG, DONE, SCALE, ZERO, OUTL, COLS: (R, n) row-major, local columns; CODES (R, d) global columns;
    H_f of row r at HF + HF_ROW[r] * stride_hm (row p at + p * stride_hr; symmetric, so row p = column
    p); UT (R, >= nsteps, n): the pending u = H^-1[:, p] / sqrt([H^-1]_pp) as rows, written here from
    row 0 on; LOSS, BROKEN, FLOOR (R,). Per step, as greedy_loop_fast with GridRule:
      choose  k = clamp(rint(w / s) + z), q = s (k - z), err = (w - q)^2 (0 if done),
              j = argmax err if any err > s^2 / 4 else argmin err / diag (done: +inf), first on ties;
      fetch   c = H_f[j, :] - sum_t u_t[j] u_t, 0 where done (kept in U's row t until scaled);
      step    e = (w_j - q_j) / max(c_j, floor), loss += (w_j - q_j) e / 2, w -= c e, w_j = q_j,
              u = c / sqrt(max(c_j, floor)), diag -= u^2.
    Rows are processed BLOCK_R at a time (vectors over rows), each row's columns BLOCK at a time. Two
    barriers per step: w_j is read before any thread overwrites it, and the next step's choice reads
    what every thread wrote.
    """
    pid = tl.program_id(0)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rm = rows < R
    rr = rows[:, None]
    offs = tl.arange(0, BLOCK)
    toffs = tl.arange(0, BLOCK_T)
    hbase = tl.load(HF_ROW + rows, mask=rm, other=0) * stride_hm  # (BLOCK_R,) offsets into HF
    ubase = rows * stride_ut
    loss = tl.load(LOSS + rows, mask=rm, other=0.0)
    broken = tl.load(BROKEN + rows, mask=rm, other=0) != 0
    floor = tl.load(FLOOR + rows, mask=rm, other=1.0)
    inf = float("inf")
    for t in range(nsteps):
        # --- choose: per row, running first-index argmin of the score and argmax of err over chunks
        best_s = tl.full((BLOCK_R,), inf, LOSS.dtype.element_ty)
        best_e = tl.full((BLOCK_R,), -1.0, LOSS.dtype.element_ty)
        js = tl.full((BLOCK_R,), 0, tl.int32)
        je = tl.full((BLOCK_R,), 0, tl.int32)
        outlier = tl.full((BLOCK_R,), 0, tl.int32)
        for c0 in range(0, n, BLOCK):
            idx = c0 + offs
            m = rm[:, None] & (idx < n)[None, :]
            off = rr * n + idx[None, :]
            w = tl.load(W + off, mask=m, other=0.0)
            s = tl.load(SCALE + off, mask=m, other=1.0)
            z = tl.load(ZERO + off, mask=m, other=0.0)
            dg = tl.load(DIAG + off, mask=m, other=1.0)
            dn = tl.load(DONE + off, mask=m, other=1) != 0
            ol = tl.load(OUTL + off, mask=m, other=inf)
            k = _clamp(_rint(w / s) + z, maxq)
            q = s * (k - z)
            err = tl.where(dn, 0.0, (w - q) * (w - q))
            score = tl.where(dn, inf, err / dg)
            loc = offs[None, :] + tl.full((BLOCK_R, BLOCK), 0, tl.int32)
            cs, ci = tl.reduce((score, loc), 1, tl.standard._argmin_combine_tie_break_left)
            js = tl.where(cs < best_s, ci + c0, js)
            best_s = tl.where(cs < best_s, cs, best_s)
            ce, ei = tl.reduce((err, loc), 1, tl.standard._argmax_combine_tie_break_left)
            je = tl.where(ce > best_e, ei + c0, je)
            best_e = tl.where(ce > best_e, ce, best_e)
            outlier = outlier | tl.reduce((err > ol).to(tl.int32), 1, tl.standard._elementwise_max)
        j = tl.where(outlier != 0, je, js).to(tl.int64)  # (BLOCK_R,)
        # --- the chosen weight and its target (read before any thread overwrites them)
        wj = tl.load(W + rows * n + j, mask=rm, other=0.0)
        sj = tl.load(SCALE + rows * n + j, mask=rm, other=1.0)
        zj = tl.load(ZERO + rows * n + j, mask=rm, other=0.0)
        kj = _clamp(_rint(wj / sj) + zj, maxq)
        qj = sj * (kj - zj)
        gj = tl.load(COLS + rows * n + j, mask=rm, other=0)
        tl.store(CODES + rows * d + gj, kj, mask=rm)
        # --- fetch the corrected column c = H_f[j, :] - U U[j, :]^T into U's row t; c_j kept on the way
        # (a masked sum of one value: exact), not read back from memory after a barrier
        tm0 = toffs[None, :] + tl.full((BLOCK_R, BLOCK_T), 0, tl.int32)
        cj = tl.full((BLOCK_R,), 0.0, LOSS.dtype.element_ty)
        for c0 in range(0, n, BLOCK):
            idx = c0 + offs
            m = rm[:, None] & (idx < n)[None, :]
            acc = tl.full((BLOCK_R, BLOCK), 0.0, LOSS.dtype.element_ty)
            for t0 in range(0, t, BLOCK_T):
                tm = (tm0 + t0) < t
                tt = (toffs + t0).to(tl.int64)
                a = tl.load(UT + ubase[:, None] + tt[None, :] * n + j[:, None], mask=tm & rm[:, None], other=0.0)
                up = UT + ubase[:, None, None] + tt[None, :, None] * n + idx[None, None, :]
                u3 = tl.load(up, mask=tm[:, :, None] & m[:, None, :], other=0.0)
                acc += tl.reduce(a[:, :, None] * u3, 1, tl.standard._sum_combine)
            dn = tl.load(DONE + rr * n + idx[None, :], mask=m, other=1) != 0
            c = tl.load(HF + hbase[:, None] + j[:, None] * stride_hr + idx[None, :], mask=m, other=0.0) - acc
            c = tl.where(dn, 0.0, c)
            tl.store(UT + ubase[:, None] + t * n + idx[None, :], c, mask=m)
            hit = (idx[None, :] == j[:, None]) & m
            cj += tl.reduce(tl.where(hit, c, 0.0), 1, tl.standard._sum_combine)
        cj = tl.where(rm, cj, 1.0)
        broken = broken | (cj <= floor)
        dj = tl.where(cj < floor, floor, cj)  # clamp_min(floor), NaN kept
        e = (wj - qj) / dj
        loss += 0.5 * (wj - qj) * e
        rs = 1.0 / tl.sqrt(dj)
        tl.debug_barrier()  # every thread has read w_j before the thread holding it overwrites it
        # --- compensate, record, queue the downdate u = c / sqrt(d_j)
        for c0 in range(0, n, BLOCK):
            idx = c0 + offs
            m = rm[:, None] & (idx < n)[None, :]
            off = rr * n + idx[None, :]
            uoff = UT + ubase[:, None] + t * n + idx[None, :]
            c = tl.load(uoff, mask=m, other=0.0)
            hit = idx[None, :] == j[:, None]
            w = tl.load(W + off, mask=m, other=0.0)
            tl.store(W + off, tl.where(hit, qj[:, None], w - c * e[:, None]), mask=m)
            u = c * rs[:, None]
            dg = tl.load(DIAG + off, mask=m, other=1.0)
            tl.store(DIAG + off, dg - u * u, mask=m)
            dn = tl.load(DONE + off, mask=m, other=1)
            tl.store(DONE + off, tl.where(hit, 1, dn).to(tl.int8), mask=m)
            tl.store(uoff, u, mask=m)
        tl.debug_barrier()  # the next step reads what this one wrote, across threads
    tl.store(LOSS + rows, loss, mask=rm)
    tl.store(BROKEN + rows, broken.to(tl.int8), mask=rm)


def gptq_block(
    W, S, Z, FZ, K, E, U, U_ROW,
    R, i1, nb, stride_w, stride_ul, stride_u, maxq,
    HAS_FZ: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """GPTQ on columns i1 .. i1 + nb of a tile of rows, the block kept in registers.

    W, S, Z, FZ (frozen, int8), K: (R, d) in visiting order; E (R, BLOCK_B) receives the scaled errors;
    U (L, d, d) upper Cholesky factors of the layers' H^-1, row r's at U + U_ROW[r] * stride_ul. Per
    column c (as gptq_codes_layers):
      k = clamp(rint(w_c / s) + z) (z where frozen), e = (w_c - s (k - z)) / U_cc,
      W[:, c:block end] -= e U[c, c:block end].
    """
    pid = tl.program_id(0)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rm = rows < R
    cb = tl.arange(0, BLOCK_B)
    cm = cb < nb
    m2 = rm[:, None] & cm[None, :]
    wptr = W + rows[:, None] * stride_w + i1 + cb[None, :]
    ubase = tl.load(U_ROW + rows, mask=rm, other=0) * stride_ul  # (BLOCK_R,) each row's layer factor
    tile = tl.load(wptr, mask=m2, other=0.0)
    etile = tile * 0.0
    for i in range(nb):
        c = tl.cast(i1 + i, tl.int64)  # c * stride_u passes 2^31 once d > 46,340
        sel = cb[None, :] == i
        wi = tl.reduce(tl.where(sel, tile, 0.0), 1, tl.standard._sum_combine)
        s = tl.load(S + rows * stride_w + c, mask=rm, other=1.0)
        z = tl.load(Z + rows * stride_w + c, mask=rm, other=0.0)
        k = _clamp(_rint(wi / s) + z, maxq)
        if HAS_FZ:
            k = tl.where(tl.load(FZ + rows * stride_w + c, mask=rm, other=0) != 0, z, k)
        tl.store(K + rows * stride_w + c, k, mask=rm)
        e = (wi - s * (k - z)) / tl.load(U + ubase + c * stride_u + c, mask=rm, other=1.0)
        urow = tl.load(U + ubase[:, None] + c * stride_u + i1 + cb[None, :], mask=m2 & (cb >= i)[None, :], other=0.0)
        tile = tl.where(cb[None, :] >= i, tile - e[:, None] * urow, tile)
        etile = tl.where(sel, e[:, None], etile)
    tl.store(wptr, tile, mask=m2)
    tl.store(E + rows[:, None] * BLOCK_B + cb[None, :], etile, mask=m2)


def polish_block(
    G, Q, K, S, Z, FROZEN, ACTIVE, MOVED, H, HD, INV_H, HALF_H, D, H_ROW,
    R, i1, nb, stride_w, stride_hl, stride_h, stride_dl, maxq,
    HAS_FROZEN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """One coordinate-descent sweep over columns i1 .. i1 + nb of a tile of rows (as polish_codes_layers).

    G, Q, K, S, Z, FROZEN: (R, d); ACTIVE, MOVED: (R,) int8; H (L, d, d), HD, INV_H, HALF_H (L, d): H_jj,
    1 / H_jj (0 if H_jj <= 0), H_jj / 2 of every layer, row r's layer H_ROW[r]; D (R, BLOCK_B) receives
    the moves. Per column j:
      k = nearest grid point to q_j - g_j / H_jj, delta = s (k - z) - q_j,
      move iff delta (g_j + delta H_jj / 2) < 0 (and the row is active, the weight free, H_jj > 0),
      g[:, j:block end] += delta H[j, j:block end].
    """
    pid = tl.program_id(0)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rm = rows < R
    cb = tl.arange(0, BLOCK_B)
    cm = cb < nb
    m2 = rm[:, None] & cm[None, :]
    off = rows[:, None] * stride_w + i1 + cb[None, :]
    layer = tl.load(H_ROW + rows, mask=rm, other=0)
    hbase = layer * stride_hl  # (BLOCK_R,) each row's layer H
    dbase = layer * stride_dl  # ... and its diagonal tables
    gt = tl.load(G + off, mask=m2, other=0.0)
    qt = tl.load(Q + off, mask=m2, other=0.0)
    kt = tl.load(K + off, mask=m2, other=0.0)
    dt = gt * 0.0
    act = (tl.load(ACTIVE + rows, mask=rm, other=0) != 0) & rm
    for i in range(nb):
        j = tl.cast(i1 + i, tl.int64)  # j * stride_h passes 2^31 once d > 46,340
        sel = cb[None, :] == i
        g = tl.reduce(tl.where(sel, gt, 0.0), 1, tl.standard._sum_combine)
        q = tl.reduce(tl.where(sel, qt, 0.0), 1, tl.standard._sum_combine)
        s = tl.load(S + rows * stride_w + j, mask=rm, other=1.0)
        z = tl.load(Z + rows * stride_w + j, mask=rm, other=0.0)
        k = _clamp(_rint((q - g * tl.load(INV_H + dbase + j, mask=rm, other=0.0)) / s) + z, maxq)
        delta = s * (k - z) - q
        take = delta * (g + tl.load(HALF_H + dbase + j, mask=rm, other=0.0) * delta) < 0.0
        take = take & act
        take = take & (tl.load(HD + dbase + j, mask=rm, other=0.0) > 0.0)
        if HAS_FROZEN:
            take = take & (tl.load(FROZEN + rows * stride_w + j, mask=rm, other=1) == 0)
        delta = tl.where(take, delta, 0.0)
        kt = tl.where(sel & take[:, None], k[:, None], kt)
        hrow = tl.load(H + hbase[:, None] + j * stride_h + i1 + cb[None, :], mask=m2 & (cb >= i)[None, :], other=0.0)
        gt = tl.where(cb[None, :] >= i, gt + delta[:, None] * hrow, gt)
        dt = tl.where(sel, delta[:, None], dt)
    moved = tl.reduce((dt != 0.0).to(tl.int8), 1, tl.standard._elementwise_max)
    tl.store(G + off, gt, mask=m2)
    tl.store(Q + off, qt + dt, mask=m2)
    tl.store(K + off, kt, mask=m2)
    tl.store(D + rows[:, None] * BLOCK_B + cb[None, :], dt, mask=m2)
    old = tl.load(MOVED + rows, mask=rm, other=0)
    tl.store(MOVED + rows, (old | moved).to(tl.int8), mask=rm)


_FUNCTIONS = {"obc_block": obc_block, "gptq_block": gptq_block, "polish_block": polish_block}
_HELPERS = {"_rint": _rint, "_clamp": _clamp}
_CACHE: dict[tuple[str, bool], object] = {}


@contextmanager
def interpreting(flag: bool):
    """Set Triton's interpreter switch (env var and, from 3.4 on, ``triton.knobs``) and restore it."""
    old_env = os.environ.get("TRITON_INTERPRET")
    rt = getattr(getattr(triton, "knobs", None), "runtime", None)
    had = rt is not None and "interpret" in vars(rt)
    old = vars(rt)["interpret"] if had else None
    os.environ["TRITON_INTERPRET"] = "1" if flag else "0"
    if rt is not None:
        rt.interpret = flag
    try:
        yield
    finally:
        if rt is not None:
            if had:
                rt.interpret = old
            else:
                del rt.interpret
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env


def kernel(name: str, interpret: bool):
    """The jitted kernel ``name``, compiled (``interpret=False``) or interpreted, built once."""
    key = (name, interpret)
    if key not in _CACHE:
        with interpreting(interpret):
            # helpers first: a kernel resolves them from its globals at compile / run time, and each
            # mode needs helpers jitted in the same mode; one module-level namespace per mode
            ns = dict(globals())
            for h, fn in _HELPERS.items():
                ns[h] = triton.jit(_rebind(fn, ns))
            _CACHE[key] = triton.jit(_rebind(_FUNCTIONS[name], ns))
    return _CACHE[key]


def _rebind(fn, ns: dict):
    """``fn`` with ``ns`` as its globals (so it calls the helpers jitted in its own mode)."""
    import types

    new = types.FunctionType(fn.__code__, ns, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__module__, new.__qualname__, new.__doc__ = fn.__module__, fn.__qualname__, fn.__doc__
    new.__annotations__ = dict(fn.__annotations__)
    new.__wrapped__ = fn
    return new
