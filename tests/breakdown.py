"""A float32 breakdown made on purpose, so that the float64 fallback is tested on every CPU.

Whether float32 rounding breaks a row down on an ill-conditioned Hessian depends on the CPU and the BLAS
(the same problem broke down on an AMD EPYC and not on an Intel Xeon). The fallback's machinery is tested
here with the engine's own breakdown signal (a NaN loss) forced on the rows a fixed rule picks; the
detection itself is tested on an exactly singular inverse in test_obc.py.
"""

import torch

import obc_lightning.solvers.obc as obc


def well_conditioned_layer(rows: int = 32, cols: int = 576, samples: int = 2000, seed: int = 0):
    """(W, H) in float32 with cond(H) ~ 10 (i.i.d. inputs, samples >> cols): no row breaks down in float32
    by itself, on any CPU, so the forced rows are the only ones the fallback sees."""
    g = torch.Generator().manual_seed(seed)
    W, X = torch.randn(rows, cols, generator=g), torch.randn(samples, cols, generator=g)
    return W, 2 * X.T @ X / samples


def rows_with_positive_last_weight(w: torch.Tensor) -> torch.Tensor:
    """The rows forced to break down: a property of each row alone, so batching cannot change it."""
    return w[:, -1] > 0


def force_float32_breakdown(monkeypatch, rule=rows_with_positive_last_weight) -> None:
    """Make the float32 greedy pass report the rows ``rule`` picks as broken (loss NaN), as it does when
    [H^-1]_pp falls to the floor; the float64 pass runs untouched."""
    real = obc._greedy

    def greedy(method, w, *args):
        codes, loss = real(method, w, *args)
        if w.dtype == torch.float32:
            loss = loss.masked_fill(rule(w), float("nan"))
        return codes, loss

    monkeypatch.setattr(obc, "_greedy", greedy)
