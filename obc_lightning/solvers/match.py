"""Output matching: the weights a layer should have on drifted inputs, and its error against the
full-precision outputs.

In sequential compression a layer sees inputs X̃ (produced by the already-compressed layers before it)
where the full-precision model gives X, sample for sample. Fitting the compressed weights to the
full-precision outputs instead of to the layer's own outputs on X̃, per row w of W:

    2/N ||X w - X̃ q||^2  =  2/N ||X w - X̃ w*||^2  +  (w* - q)^T H̃ (w* - q),

    H̃ = 2/N X̃^T X̃,   C = 2/N X̃^T X,   w* = H̃^-1 C w,   i.e.  W* = W C^T H̃^-1

(w* solves the normal equations H̃ w* = C w of min_v ||X w - X̃ v||^2, so the cross term
2 (w* - q)^T (H̃ w* - C w) vanishes). The first term is fixed before any quantization; the second is
the ordinary layer objective of the target W* on H̃, which every solver (ExactOBC, GPTQ, the polish,
OBS pruning, product quantization) minimises unchanged.

Damping: W* = (W C^T + lam W)(H̃ + lam I)^-1 with lam = damp * mean(diag H̃) minimises
2/N ||X w - X̃ v||^2 + lam ||v - w||^2: it pulls W* towards W, not towards 0, so that with no drift
(C = H̃) W* = W at every damping. The decomposition above then holds up to a term of order lam; the
objective reported (:func:`matched_objective`) is computed directly and is exact for any q.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from obc_lightning.checks import check_nonnegative
from obc_lightning.solvers.common import DAMP_ESCALATION, HessianDampingWarning, isolate_dead_inputs

# W* further than this from W (Frobenius norm, relative to ||W||) is announced: the least-squares
# correction may then be dominated by directions H̃ barely sees (few samples, nearly dependent inputs);
# on MiniLM at damp 1e-6 five layers went past it (1.0-2.8x) and the embeddings were worse than at 1e-2,
# where no layer of MiniLM or ResNet-20 did
SHIFT_WARNING = 1.0
# bytes of the per-row systems solved at once for rows with pruned (exactly zero) weights
MASKED_SOLVE_BYTES = 256 * 2**20


def matched_weight(
    matrix: Tensor,
    cross: Tensor,
    hessian: Tensor,
    damp: float = 0.01,
    *,
    fn: str = "matched_weight",
    what: str = "the weight",
) -> tuple[Tensor, float]:
    """W* = (W C^T + lam W)(H̃ + lam I)^-1, lam = damp * mean(diag H̃), by a Cholesky solve.

    Args:
        matrix: W (rows, d), the full-precision weight.
        cross: W C^T (rows, d) = 2/N sum_n (W x_n) x̃_n^T.
        hessian: H̃ (d, d) = 2/N X̃^T X̃.
        damp: relative damping; if H̃ + lam I is not positive definite, the solvers' escalation
            (:data:`~obc_lightning.solvers.common.DAMP_ESCALATION`) is tried with a warning naming ``what``.

    Dead inputs (H̃_pp = 0: always 0 in X̃) carry no information about their weight: their column of W*
    is 0, as every solver sets it. Weights of W that are exactly 0 on live inputs (pruned) stay 0: their
    rows are solved on the kept inputs only (the principal subsystem of H̃). Computed in float64;
    returned in ``matrix``'s dtype with the damping used.
    """
    check_nonnegative(fn, "damp", damp)
    W = matrix.detach().to(torch.float64)
    G = cross.to(device=W.device, dtype=torch.float64)
    H, dead, mean_diag = isolate_dead_inputs(hessian.to(device=W.device, dtype=torch.float64))
    mean_diag = float(mean_diag)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    pruned = (W == 0) & ~dead
    for attempt, d in enumerate([float(damp)] + [x for x in DAMP_ESCALATION if x > damp]):
        lam = d * mean_diag
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) != 0:
            continue
        rhs = G + lam * W
        Wstar = torch.cholesky_solve(rhs.T, L).T
        rows = pruned.any(dim=1).nonzero().flatten()
        if len(rows) and not _solve_masked(Wstar, rhs, H + lam * eye, pruned, rows):
            continue
        if not torch.isfinite(Wstar).all():
            continue
        if attempt:
            warnings.warn(
                f"{fn}: output matching of {what}: the Hessian of its inputs in the compressed model "
                f"({H.shape[0]}x{H.shape[1]}) is not positive definite at damp={damp:g}; used damp={d:g} x "
                f"mean(diag H) for the least-squares target instead",
                HessianDampingWarning,
                stacklevel=2,
            )
        break
    else:
        raise ValueError(
            f"{fn}: output matching of {what}: the Hessian of its inputs ({H.shape[0]}x{H.shape[1]}) could not "
            f"be made positive definite even with damp={DAMP_ESCALATION[-1]:g}"
        )
    Wstar[:, dead] = 0
    Wstar[pruned] = 0
    norm = float(W.norm())
    shift = float((Wstar - W).norm()) / norm if norm > 0 else 0.0
    if shift > SHIFT_WARNING:
        warnings.warn(
            f"{fn}: output matching of {what}: the least-squares target moved the weights by {shift:.3g} x "
            f"their norm; the fit may follow directions its inputs barely cover (too few samples for its "
            f"{H.shape[0]} inputs, nearly dependent inputs) or the earlier layers changed its inputs a lot: "
            f"more calibration data or a larger damp keeps the target closer to the weights",
            UserWarning,
            stacklevel=2,
        )
    return Wstar.to(matrix.dtype), d


def _solve_masked(Wstar: Tensor, rhs: Tensor, Hd: Tensor, pruned: Tensor, rows: Tensor) -> bool:
    """Rows with pruned weights: w*_K = (Hd_KK)^-1 rhs_K on their kept inputs K, the pruned entries 0,
    written into ``Wstar``; the per-row systems in chunks of MASKED_SOLVE_BYTES. False if not PD."""
    d = Hd.shape[0]
    chunk = max(1, MASKED_SOLVE_BYTES // (8 * d * d))
    for i in range(0, len(rows), chunk):
        r = rows[i : i + chunk]
        z = pruned[r]  # (k, d)
        Hm = Hd.unsqueeze(0).repeat(len(r), 1, 1)
        Hm.masked_fill_(z.unsqueeze(2) | z.unsqueeze(1), 0)
        Hm.diagonal(dim1=1, dim2=2).masked_fill_(z, 1)
        L, info = torch.linalg.cholesky_ex(Hm)
        if bool((info != 0).any()):
            return False
        b = rhs[r].masked_fill(z, 0).unsqueeze(2)
        Wstar[r] = torch.cholesky_solve(b, L).squeeze(2)
    return True


def matched_objective(quantized: Tensor, cross: Tensor, energy: Tensor, hessian: Tensor) -> Tensor:
    """Per row: 1/2 * 2/N ||X w - X̃ q||^2, the layer objective against the full-precision outputs.

    With H = 2/N X^T X, C = 2/N X̃^T X and H̃ = 2/N X̃^T X̃ the square expands to
        1/2 (w^T H w - 2 q^T C w + q^T H̃ q) = 1/2 (energy - 2 q . cross_row + q^T H̃ q),
    ``energy`` (rows,) = diag(W H W^T), ``cross`` (rows, d) = W C^T: exact for any q (no assumption
    that q is near the least-squares target). Computed in float64.
    """
    Q = quantized.to(torch.float64)
    G = cross.to(device=Q.device, dtype=torch.float64)
    H = hessian.to(device=Q.device, dtype=torch.float64)
    e = energy.to(device=Q.device, dtype=torch.float64)
    return 0.5 * (e - 2 * (Q * G).sum(dim=1) + ((Q @ H) * Q).sum(dim=1))
