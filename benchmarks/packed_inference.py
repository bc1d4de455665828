"""In-process PyTorch inference with packed modules: float vs packed (dequantize path) vs packed (torch's
low-bit kernel), peak memory and latency at batch 1 and 64, on an MLP and a MiniLM-sized transformer.

    python benchmarks/packed_inference.py                         # 4-bit, group 128 (int4 kernel)
    python benchmarks/packed_inference.py --bits 8 --group-size 0 # 8-bit per row (int8 kernel)

Every (model, path) runs in its own process, one thread (``torch.set_num_threads(1)``), with glibc's mmap
threshold fixed (``MALLOC_MMAP_THRESHOLD_``) so that a freed tensor leaves the resident set at once. Per
row: the model's tensors (parameters, buffers and the kernel layouts, counted exactly); the process's
resident memory with the model ready, above the same process after ``import torch``; the peak resident
memory during the forward passes above that (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``):
what inference adds (activations, and the dense weight the dequantize path makes per module); the
median latency of a forward (``torch.inference_mode``; 9 runs at batch 1, 3 at batch 64). Ratios are
against the float32 model of the same run. "bf16" rows: the model and its inputs in bfloat16 (the packed
model dequantizes to, and its kernels take, bfloat16). The codes come from round-to-nearest on a
per-group min-max grid: the solver changes neither memory nor speed, and round-to-nearest keeps the
benchmark short.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

MODELS = ("mlp", "transformer")
# (path, activation and weight dtype): the float model, the packed model on its exact path, with kernels
PATHS = ("float", "dequantize", "kernel", "float bf16", "kernel bf16")


# ------------------------------------------------------------------ one measurement, in a child process
def status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS
        return True
    except OSError:
        return False


def build(name: str):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class MLP(nn.Module):
        def __init__(self, d=1024, hidden=4096):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(d, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, d)

        def forward(self, x):
            return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))

    class Block(nn.Module):  # a BERT / MiniLM encoder layer: post-norm, GELU
        def __init__(self, d=384, heads=12, ff=1536):
            super().__init__()
            self.heads = heads
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.up, self.down = nn.Linear(d, ff), nn.Linear(ff, d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
            x = self.ln1(x + self.o(a))
            return self.ln2(x + self.down(F.gelu(self.up(x))))

    torch.manual_seed(0)
    if name == "mlp":
        return MLP(), lambda batch: torch.randn(batch, 1024)
    return nn.Sequential(*(Block() for _ in range(6))), lambda batch: torch.randn(batch, 32, 384)


def pack_round_to_nearest(model, bits: int, group_size: int | None) -> None:
    """Replace every Linear by a QuantizedLinear holding round-to-nearest codes, one module at a time."""
    import torch

    from obc_lightning.formats.bits import dtype_name
    from obc_lightning.formats.scalar import ScalarScheme
    from obc_lightning.packed import QuantizedLinear, swap_module

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for name in names:
        m = model.get_submodule(name)
        w = m.weight.detach()
        rows, cols = w.shape
        gs = cols if group_size is None else group_size
        wg = w.float().reshape(rows, cols // gs, gs)
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scales = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8).to(torch.float16)
        zeros = torch.round(-lo / scales.float()).clamp(0, 2**bits - 1)
        codes = (torch.round(wg / scales.float().unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, 2**bits - 1)
        config = {"kind": "Linear", "scheme": "affine", "bits": bits, "group_size": group_size,
                  "scale_dtype": "float16", "dtype": dtype_name(w.dtype)}
        tensors = ScalarScheme.pack(config, codes.reshape(rows, cols), scales, zeros.to(torch.uint8))
        swap_module(model, name, QuantizedLinear.from_dense(m, config, tensors))
        del m, w, wg, codes


def measure(model_name: str, path: str, bits: int, group_size: int | None) -> dict:
    import torch

    torch.set_num_threads(1)
    base = status_kib("VmRSS")
    model, make_float_input = build(model_name)
    dtype = torch.bfloat16 if path.endswith("bf16") else torch.float32
    model.eval().to(dtype)

    def make_input(batch):
        return make_float_input(batch).to(dtype)

    out: dict = {}
    if not path.startswith("float"):
        from obc_lightning.packed import set_kernel

        pack_round_to_nearest(model, bits, group_size)
        # fp32 on CPU: "auto" dequantizes (the kernels are slow there): force them to measure them
        routes = set_kernel(model, "kernel" if path.startswith("kernel") else "dequantize")
        out["routes"] = sorted(set(routes.values()))
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    with torch.inference_mode():
        model(make_input(1))  # kernel layouts are built at the first forward
    layouts = sum(
        lw.nbytes for m in model.modules() for lw in getattr(m, "_lowbit", {}).values() if not isinstance(lw, str)
    )
    out["model_mb"] = (held + layouts) / 2**20
    ready = status_kib("VmRSS")
    out["rss_mb"] = None if base is None or ready is None else (ready - base) / 1024
    for batch, reps in ((1, 9), (64, 3)):
        slow = path == "kernel" and batch > 1  # torch's float32 CPU kernels: ~20 s per MLP forward here
        if slow and model_name != "mlp":
            out[f"peak_mb_{batch}"] = out[f"ms_{batch}"] = None  # minutes per forward: not run
            continue
        x = make_input(batch)
        reps = 1 if slow else reps
        with torch.inference_mode():
            if not slow:
                model(x)
            ok = reset_peak()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
        peak = status_kib("VmHWM")
        out[f"peak_mb_{batch}"] = (peak - ready) / 1024 if ok and peak is not None and ready is not None else None
        out[f"ms_{batch}"] = sorted(times)[len(times) // 2] * 1e3
    return out


# ------------------------------------------------------------------ the table
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M).group(1)
    except (OSError, AttributeError):
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, 1 thread used; torch {torch.__version__}; {platform.platform()}"


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128, help="0: one grid per row")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--paths", nargs="+", choices=PATHS, help="a subset of the paths (float always runs)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    group_size = args.group_size or None
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.bits, group_size)))
        return

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    print(f"machine: {machine()}")
    print(f"packed: {args.bits}-bit, group_size={group_size}; transformer input 32 tokens per sequence\n")
    head = ("model", "path", "tensors MB", "RSS MB", "peak+ b1 MB", "peak+ b64 MB", "ms b1", "ms b64", "x float b1",
            "x float b64")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    routes = {}
    for model_name in args.models:
        rows = {}
        for path in PATHS:
            cmd = [sys.executable, __file__, "--bits", str(args.bits), "--group-size", str(args.group_size),
                   "--child", model_name, path]
            if args.paths and path not in (*args.paths, "float"):
                continue
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            rows[path] = r = json.loads(res.stdout.strip().splitlines()[-1])
            f = rows["float"]
            print(f"| {model_name} | {path} | {r['model_mb']:.1f} | {fmt(r['rss_mb'], '.1f')} | "
                  f"{fmt(r['peak_mb_1'], '.1f')} | {fmt(r['peak_mb_64'], '.1f')} | {r['ms_1']:.2f} | "
                  f"{fmt(r['ms_64'], '.1f')} | {f['ms_1'] / r['ms_1']:.2f} | "
                  f"{'n/a' if r['ms_64'] is None else format(f['ms_64'] / r['ms_64'], '.2f')} |", flush=True)
            if "routes" in r:
                routes[(model_name, path)] = r["routes"]
    print("\n'kernel' (float32) is forced (set_kernel(model, 'kernel')): 'auto' dequantizes there; at batch 64 "
          "it ran once (the MLP) or not at all (the transformer: minutes per forward).")
    print("'x float': float latency / this latency (above 1: faster than float). 'peak+': peak resident memory "
          "during the forwards above the resident memory with the model ready.")
    for (model_name, path), r in routes.items():
        print(f"{model_name}, {path}: Linear layers run {' / '.join(r)}")


if __name__ == "__main__":
    main()
