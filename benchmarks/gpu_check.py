"""One command for a GPU machine: what the first (perhaps only) GPU run must measure, kept as it comes.

    python benchmarks/gpu_check.py --out DIR        # on a CUDA machine (torch, lightning, triton; no internet)
    python benchmarks/gpu_check.py --cpu-smoke --out DIR   # every part on tiny shapes, kernels interpreted

Every figure is printed as one line when it is measured and appended to ``DIR/results.jsonl`` (one JSON
object a line, flushed and synced), so an error or a killed run keeps everything measured before it.
Each part runs in its own ``try``: an exception is printed and recorded (``"error"``) and the next part
runs. The parts share a deadline (``--budget``, 420 s: an 8-minute slot with a minute of margin); a part
whose estimate does not fit in the time left is skipped and the skip is recorded.

Parts, in order:
- ``machine``: GPU, memory, SM count, clocks (nvidia-smi when present), driver, torch, CUDA, Triton.
- ``warmup``: compiles every kernel specialisation the layer sets below need (Triton specialises on the
  block width, which shrinks with the working set, and on each integer argument's divisibility by 16):
  each layer is solved once on a few rows of the same divisibility class, in every mode timed later.
  Its seconds are the compile time; later parts report ``compiled_in_timing`` (kernels compiled inside
  a timed region; 0 means the timings hold no compilation).
- ``networks``: ResNet-18 and ResNet-50 conv/fc layer sets (real shapes, random weights, Hessians of
  correlated synthetic feature maps unfolded with each layer's kernel): seconds for ``exact_obc`` and
  the default ``quantize_weight`` (``auto``), layer after layer and batched by width
  (``quantize_weights``), peak memory, and whether the batched codes equal the per-layer ones.
- ``flush``: the flush FLOPs per ResNet-18 layer, counted (the engine before issue 35 against this one),
  and one flush timed on the device: the old in-place rank-B update of the whole working set against
  the live-block flush, full product and symmetric blocks.
- ``reference``: the fused engine against the in-place one-step loop (``method="reference"``, a row
  subset, scaled to all rows).
- ``launches``: kernel launches per column step (``torch.profiler``) on one layer.
- ``tests``: the ``cuda``-marked tests (fp32 kernels held to the plain loop's fp32 error, no host sync in
  the step loops, the memory budget, float64 CPU/GPU, the TF32 guard, the callback on one GPU), with
  pass/fail counts and the name of every failure.
- ``sharded``: with more than one GPU, the default solver over each layer set shared out over all GPUs
  (NCCL, one process per GPU) against one GPU batched by width (``--cpu-smoke``: 2 gloo processes).
Nothing here is a pass/fail of speed: it records what it measured, with the machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from obc_lightning import exact_obc, quantize_weight  # noqa: E402
from obc_lightning.kernels import ENV, triton_available  # noqa: E402
from obc_lightning.solvers.quantize import quantize_weights  # noqa: E402

T0 = time.perf_counter()
BUDGET_S = 420.0


def left() -> float:
    return BUDGET_S - (time.perf_counter() - T0)


class Recorder:
    """Writes each figure as it comes: a line on stdout and a JSON line in ``out/results.jsonl``."""

    def __init__(self, out: str):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, "results.jsonl")
        self.part = "main"

    def _write(self, record: dict) -> None:
        record = {"t": round(time.perf_counter() - T0, 2), "part": self.part, **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def figure(self, name: str, value, unit: str = "", **info) -> None:
        extra = "".join(f"  {k}={v}" for k, v in info.items())
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"[{time.perf_counter() - T0:6.1f} s] {self.part} | {name} = {shown} {unit}{extra}", flush=True)
        self._write({"name": name, "value": value, "unit": unit, **info})

    def note(self, msg: str, **info) -> None:
        print(f"[{time.perf_counter() - T0:6.1f} s] {self.part} | {msg}", flush=True)
        self._write({"note": msg, **info})

    def error(self, exc: BaseException) -> None:
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        print("".join(tb[-6:]).rstrip(), flush=True)
        self.note(f"ERROR {type(exc).__name__}: {exc}", error=f"{type(exc).__name__}: {exc}")


class PartFailure(RuntimeError):
    """Raised by ``--fail-part NAME`` at the start of that part (to check that the others survive)."""


def run_part(rec: Recorder, name: str, need_s: float, fn, fail: str | None, *args) -> object:
    """Run part ``name`` if its estimate ``need_s`` fits the time left; record any error and go on."""
    rec.part = name
    if left() < need_s:
        rec.note(f"SKIPPED: {left():.0f} s left, the part needs ~{need_s:.0f} s", skipped=True)
        return None
    rec.note(f"start (~{need_s:.0f} s budgeted, {left():.0f} s left)")
    t = time.perf_counter()
    try:
        if fail == name:
            raise PartFailure(f"--fail-part {name}")
        return fn(rec, *args)
    except Exception as exc:  # one part's failure must not lose the others' figures
        rec.error(exc)
        return None
    finally:
        rec.figure("part_seconds", time.perf_counter() - t, "s")
        gc.collect()  # an out-of-memory error's frames hold tensors: free them for the next part
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # and the cache, for the tests' own process


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiled_kernels() -> int | None:
    """Compiled variants of the fused kernels so far (None where Triton's cache layout is unknown)."""
    try:
        from obc_lightning.kernels import triton_kernels as tk
    except Exception:
        return None
    total = 0
    try:
        for (_, interpret), fn in tk._CACHE.items():
            if not interpret:  # Triton 3.x: device -> (kernel cache, ...)
                total += sum(len(v[0]) for v in fn.device_caches.values())
    except Exception:  # another cache layout: unknown, not an error of the run
        return None
    return total


# ------------------------------------------------------------------ layer sets (out, in, kernel)
def resnet18_layers() -> list[tuple[str, int, int, int]]:
    out = [("conv1", 64, 3, 7)]
    cin = 64
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            name = f"layer{stage}.{block}"
            out.append((f"{name}.conv1", width, cin, 3))
            out.append((f"{name}.conv2", width, width, 3))
            if block == 0 and cin != width:
                out.append((f"{name}.downsample", width, cin, 1))
            cin = width
    out.append(("fc", 1000, 512, 1))
    return out


def resnet50_layers() -> list[tuple[str, int, int, int]]:
    out = [("conv1", 64, 3, 7)]
    cin = 64
    for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        for block in range(blocks):
            name = f"layer{stage}.{block}"
            out.append((f"{name}.conv1", width, cin, 1))
            out.append((f"{name}.conv2", width, width, 3))
            out.append((f"{name}.conv3", 4 * width, width, 1))
            if block == 0:
                out.append((f"{name}.downsample", 4 * width, cin, 1))
            cin = 4 * width
    out.append(("fc", 1000, 2048, 1))
    return out


def tiny_layers() -> list[tuple[str, int, int, int]]:
    """--cpu-smoke: the interpreter's cost is per operation and step, so few narrow layers (two of one
    width, to exercise batching by width)."""
    return [("conv1", 4, 2, 3), ("conv2", 3, 2, 3), ("fc", 5, 8, 1)]


def synthetic_hessian(cin: int, k: int, device, samples: int, seed: int = 0) -> torch.Tensor:
    """H = 2/N X^T X of feature maps with correlated channels and smooth space, unfolded k x k (padding
    k // 2) as the layer sees them: the layer's real geometry, synthetic data."""
    g = torch.Generator(device="cpu").manual_seed(seed + 1000 * cin + k)
    side = 8
    n_img = max(2, -(-samples // (side * side)))
    mix = (torch.eye(cin) + 0.5 * torch.randn(cin, cin, generator=g) / cin**0.5).to(device)
    x = torch.randn(n_img, side, side, cin, generator=g).to(device) @ mix
    x = x.permute(0, 3, 1, 2).contiguous()
    x = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1) + 0.3 * x  # spatial correlation
    x = x * torch.exp(0.5 * torch.randn(cin, generator=g)).to(device).view(1, -1, 1, 1)
    X = torch.nn.functional.unfold(x, k, padding=k // 2).transpose(1, 2).reshape(-1, cin * k * k)
    return 2 * X.T @ X / X.shape[0]



# ------------------------------------------------------------------ parts
def layer_problems(layers, device, hess: dict, rows_cap=None, dtype=torch.float32):
    """(name, W, H) of every layer: random W (seeded by the layer's index), the synthetic H of its geometry."""
    out = []
    for i, (name, cout, cin, k) in enumerate(layers):
        d = cin * k * k
        if (cin, k) not in hess:
            hess[(cin, k)] = synthetic_hessian(cin, k, device, samples=max(256, 2 * d))
        rows = cout if rows_cap is None else min(cout, rows_cap)
        W = torch.randn(rows, d, generator=torch.Generator().manual_seed(i)).to(device, dtype)
        out.append((name, W, hess[(cin, k)]))
    return out


def part_machine(rec: Recorder, device) -> None:
    from importlib.metadata import version

    import triton

    rec.figure("python", platform.python_version())
    rec.figure("torch", torch.__version__)
    rec.figure("lightning", version("lightning"))
    rec.figure("triton", triton.__version__)
    rec.figure("cuda_runtime", str(torch.version.cuda))
    rec.figure("cpu", platform.processor() or platform.machine(), threads=torch.get_num_threads())
    rec.figure("kernels", os.environ.get(ENV, "auto"))
    if device.type != "cuda":
        rec.note("CPU smoke: kernels interpreted, timings mean nothing")
        return
    p = torch.cuda.get_device_properties(device)
    rec.figure("gpu", p.name, count=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}")
    rec.figure("gpu_memory", p.total_memory / 2**30, "GiB", sms=p.multi_processor_count)
    free, total = torch.cuda.mem_get_info(device)
    rec.figure("gpu_memory_free", free / 2**30, "GiB")
    if shutil.which("nvidia-smi"):
        q = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu"
        r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        for key, val in zip(q.split(","), r.stdout.strip().splitlines()[0].split(", ") if r.stdout else []):
            rec.figure(key, val.strip())


def spec_class(n: int) -> str:
    """How Triton specialises an integer argument: equal to 1, divisible by 16, or neither."""
    return "one" if n == 1 else "div16" if n % 16 == 0 else "other"


def warm_rows(rows: int) -> int:
    """Fewest rows in the specialisation class of ``rows`` (the kernels' row-count argument)."""
    return {"one": 1, "div16": 16, "other": 2}[spec_class(rows)]


def batched_warm_rows(counts: list[int]) -> list[int]:
    """Rows per layer (at most each layer's) for a batched warm-up whose total has the class of
    ``sum(counts)``: the batched kernels see the stacked rows of all layers."""
    want = spec_class(sum(counts))
    first = [min(c, 16) for c in counts[:-1]]
    for last in range(1, min(counts[-1], 32) + 1):
        if spec_class(sum(first) + last) == want:
            return first + [last]
    return list(counts)


def net_sets(smoke: bool) -> dict:
    return {"tiny": tiny_layers()} if smoke else {"ResNet-18": resnet18_layers(), "ResNet-50": resnet50_layers()}


MODES = ("exact_obc", "auto", "exact_obc, batched by width", "auto, batched by width")


def solve(mode: str, probs: list) -> list:
    """The codes of every (name, W, H) in ``probs`` solved in ``mode`` (one call per layer, or per width)."""
    if "batched" not in mode:
        if mode == "exact_obc":
            return [exact_obc(W, H, 4, damp=0.01, batch_size=None).codes for _, W, H in probs]
        return [quantize_weight(W, H, 4).codes for _, W, H in probs]
    kw = dict(solver="obc", polish=False) if mode.startswith("exact_obc") else {}
    return [r.codes for r in quantize_weights([(W, H) for _, W, H in probs], 4, damp=0.01, **kw)]


def by_width(probs: list) -> dict[int, list[int]]:
    widths: dict[int, list[int]] = {}
    for i, (_, W, _) in enumerate(probs):
        widths.setdefault(W.shape[1], []).append(i)
    return widths


def part_warmup(rec: Recorder, device, smoke: bool, hess: dict) -> None:
    """Every kernel variant the timed parts use, compiled once: each layer on few rows, every mode."""
    for net, layers in net_sets(smoke).items():
        if not smoke and left() < 240:
            rec.note(f"stopped before {net}: {left():.0f} s left; its timings will include compilation", skipped=True)
            break
        probs = layer_problems(layers, device, hess, 4 if smoke else None)
        if smoke:  # nothing compiles in the interpreter: the code path on one layer is enough
            probs = probs[:1]
        t, before = time.perf_counter(), compiled_kernels()
        for mode in MODES:
            if "batched" not in mode:
                small = [(n, W[: warm_rows(W.shape[0])], H) for n, W, H in probs]
                solve(mode, small)
            else:
                for idx in by_width(probs).values():
                    rows = batched_warm_rows([probs[i][1].shape[0] for i in idx])
                    solve(mode, [(probs[i][0], probs[i][1][:r], probs[i][2]) for i, r in zip(idx, rows)])
        sync(device)
        after = compiled_kernels()
        new = None if after is None or before is None else after - before
        rec.figure(f"{net} compile", time.perf_counter() - t, "s", kernels_compiled=new)


def part_networks(rec: Recorder, device, smoke: bool, hess: dict) -> None:
    """Each layer set solved layer after layer and batched by width, each mode timed on its own."""
    rows_cap = 4 if smoke else None
    for net, layers in net_sets(smoke).items():
        probs = layer_problems(layers, device, hess, rows_cap)
        widths = by_width(probs)
        per_layer = {}
        for mode in MODES:
            est = 5 if smoke else (25 if net == "ResNet-18" else 45)
            if left() < est:
                rec.note(f"SKIPPED {net} {mode}: {left():.0f} s left (needs ~{est} s)", skipped=True)
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            secs, done, codes, before = 0.0, 0, {}, compiled_kernels()
            groups = [[i] for i in range(len(probs))] if "batched" not in mode else list(widths.values())
            for idx in groups:
                if left() < 10:
                    rec.note(f"stopped {net} {mode} after {done} layers: time", skipped=True)
                    break
                sync(device)
                t = time.perf_counter()
                out = solve(mode, [probs[i] for i in idx])
                sync(device)
                secs += time.perf_counter() - t
                codes.update(zip(idx, out))
                done += len(idx)
            after = compiled_kernels()
            info = dict(layers=f"{done}/{len(layers)}",
                        compiled_in_timing=None if after is None or before is None else after - before)
            if device.type == "cuda":
                info["peak_MiB"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
            if "batched" in mode:
                base = per_layer.get(mode.split(",")[0])
                if base is not None:
                    common = [i for i in codes if i in base]
                    info["codes_equal_per_layer"] = (all(torch.equal(codes[i], base[i]) for i in common), len(common))
            else:
                per_layer[mode] = codes
            rec.figure(f"{net} {mode}", secs, "s", **info)


def part_flush(rec: Recorder, device, smoke: bool) -> None:
    """Flush FLOPs per ResNet-18 layer, counted, and one flush timed: old in place vs the live block."""
    from obc_lightning.solvers.common import default_block_size
    from obc_lightning.solvers.obc import flush_flops, symmetric_blocks

    blocks = symmetric_blocks(device)
    old_total = new_total = 0
    for name, cout, cin, k in resnet18_layers():
        d = cin * k * k
        B = default_block_size(d)
        old, new = cout * flush_flops(d, B, "half"), cout * flush_flops(d, B, "live", blocks)
        old_total, new_total = old_total + old, new_total + new
        rec.figure(f"ResNet-18 {name} flush GFLOP", new / 1e9, "GFLOP", before=round(old / 1e9, 3),
                   ratio=round(new / old, 3), rows=cout, cols=d, block=B, symmetric_blocks=blocks)
    rec.figure("ResNet-18 flush GFLOP, all layers", new_total / 1e9, "GFLOP", before=round(old_total / 1e9, 2),
               ratio=round(new_total / old_total, 3))
    shapes = [(4, 48)] if smoke else [(64, 576), (128, 2304), (64, 4608)]
    for R, n in shapes:
        if left() < (2 if smoke else 20):
            rec.note(f"SKIPPED flush timing {R} x {n}: {left():.0f} s left", skipped=True)
            continue
        B = default_block_size(n)
        g = torch.Generator(device="cpu").manual_seed(0)
        A = torch.randn(n, n, generator=g).to(device)
        src = (A @ A.T / n + torch.eye(n, device=device)).unsqueeze(0)
        ut = (0.01 * torch.randn(R, B, n, generator=g)).to(device)
        keep = torch.arange(B, n, device=device).expand(R, n - B).contiguous()
        uk = ut.gather(2, keep.unsqueeze(1).expand(R, B, n - B))
        rows = torch.zeros(R, dtype=torch.long, device=device)
        for label, fn in flush_variants(src, ut, keep, uk, rows).items():
            fn()
            sync(device)
            times = []
            for _ in range(3 if smoke else 5):
                t = time.perf_counter()
                fn()
                sync(device)
                times.append(time.perf_counter() - t)
            rec.figure(f"flush {R} x {n}, B {B}: {label}", sorted(times)[len(times) // 2] * 1e3, "ms")


def flush_variants(src, ut, keep, uk, rows) -> dict:
    """One flush of R rows three ways (each callable repeats it on the same data)."""
    from obc_lightning.solvers.obc import FlushBuffers, flush_live

    R, _, n = ut.shape
    hf, bufs = src.expand(R, n, n).clone(), FlushBuffers()
    return {
        "in place, whole set (before)": lambda: hf.baddbmm_(ut.transpose(1, 2), ut, alpha=-1),
        "live block, full product": lambda: flush_live(src, rows, keep, uk, bufs, 1),
        "live block, symmetric blocks": lambda: flush_live(src, rows, keep, uk, bufs, 4),
    }


def part_reference(rec: Recorder, device, smoke: bool) -> None:
    shapes = [(4, 2, 3), (4, 8, 1)] if smoke else [(128, 128, 3), (512, 512, 3)]
    subset = {4: 2} if smoke else {128: 16, 512: 8}
    for cout, cin, k in shapes:
        d = cin * k * k
        need = 5 if smoke else (30 if d <= 1152 else 90)
        if left() < need:
            rec.note(f"SKIPPED reference ratio on {cout} x {d}: {left():.0f} s left", skipped=True)
            continue
        H = synthetic_hessian(cin, k, device, samples=2 * d)
        W = torch.randn(cout, d, generator=torch.Generator().manual_seed(1)).to(device)
        exact_obc(W[: warm_rows(cout)], H, 4, damp=0.01)  # compile this width's variants
        sync(device)
        t = time.perf_counter()
        exact_obc(W, H, 4, damp=0.01, batch_size=None)
        sync(device)
        fast = time.perf_counter() - t
        r = subset.get(cout, 2)
        t = time.perf_counter()
        exact_obc(W[:r], H, 4, damp=0.01, method="reference", batch_size=r)
        sync(device)
        ref = (time.perf_counter() - t) * cout / r
        rec.figure(f"exact_obc {cout} x {d}: fused engine", fast, "s", reference_scaled_s=round(ref, 3),
                   reference_rows=r, ratio=round(ref / fast, 2))


def part_launches(rec: Recorder, device, smoke: bool) -> None:
    rows, cin, k = (4, 2, 3) if smoke else (128, 128, 3)
    d = cin * k * k
    H = synthetic_hessian(cin, k, device, samples=2 * d)
    W = torch.randn(rows, d, generator=torch.Generator().manual_seed(0)).to(device)
    solvers = (("exact_obc", lambda: exact_obc(W, H, 4, damp=0.01)), ("auto", lambda: quantize_weight(W, H, 4)))
    for solver, fn in solvers:
        if device.type == "cuda":
            fn()  # compile outside the profile
            sync(device)
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                sync(device)
            kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        else:
            from obc_lightning.kernels.counting import count_launches

            with count_launches() as c:
                fn()
            kernels = c.total
        rec.figure(f"launches per column step, {solver} ({rows} x {d})", kernels / d)


def part_tests(rec: Recorder, smoke: bool) -> None:
    files = ["tests/test_cuda.py", "tests/test_obc.py", "tests/test_precision.py"]  # where `cuda` tests live
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", "-p", "no:cacheprovider", *files]
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10, min(200, left() - 40)))
    except subprocess.TimeoutExpired:
        rec.note("the cuda tests ran past their time and were stopped", error="timeout")
        return
    lines = (r.stdout + r.stderr).strip().splitlines()
    print("\n".join(lines[-30:]), flush=True)
    summary = lines[-1] if lines else ""
    counts = {word: int(num) for num, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    rec.figure("cuda tests", summary, returncode=r.returncode, **counts)
    for line in lines:
        if line.startswith(("FAILED", "ERROR")):
            rec.note(line, error=line)


def _sharded_worker(rank: int, world: int, backend: str, rendezvous: str, net: str, out: str) -> None:
    """One rank of part 5: the layer set as modules on this rank's device, solved with
    ``solve_modules(distributed=True)`` (default ``auto``), every weight written as it arrives."""
    import torch.distributed as dist

    from obc_lightning.calibration import LayerHessian
    from obc_lightning.scheduling import SolveSettings, solve_modules

    dist.init_process_group(backend, init_method="file://" + rendezvous, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    layers = {"tiny": tiny_layers(), "ResNet-18": resnet18_layers(), "ResNet-50": resnet50_layers()}[net]
    targets, hessians = {}, {}
    for name, W, H in layer_problems(layers, device, {}, 4 if net == "tiny" else None):
        m = torch.nn.Linear(W.shape[1], W.shape[0], bias=False).to(device)
        m.weight.data.copy_(W)
        targets[name] = m
        hessians[name] = LayerHessian(name, H.double().unsqueeze(0), 1024, 1)
    settings = SolveSettings(bits=4, solver="auto", damp=0.01, scale_dtype=None)
    dist.barrier()
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        for solved in solve_modules(hessians, targets, settings, distributed=True):
            targets[solved.name].weight.copy_(solved.weight)
    sync(device)
    secs = time.perf_counter() - t
    if rank == 0:
        with open(out, "w") as f:
            f.write(f"{secs}")
    dist.destroy_process_group()


def sharded_main(net: str, backend: str, world: int, out: str) -> None:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_sharded_worker, args=(world, backend, os.path.join(tmp, "rendezvous"), net, out), nprocs=world)


def part_sharded(rec: Recorder, smoke: bool) -> None:
    """The default solver shared out over all GPUs (NCCL; with --cpu-smoke: 2 gloo processes on CPU)."""
    world = 2 if smoke else torch.cuda.device_count()
    if world < 2:
        rec.note(f"{world} GPU here, nothing to share out")
        return
    import tempfile

    for net in net_sets(smoke):
        need = 20 if smoke else (60 if net == "ResNet-18" else 120)
        if left() < need:
            rec.note(f"SKIPPED sharded {net}: {left():.0f} s left (needs ~{need} s)", skipped=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            res = os.path.join(tmp, "seconds")
            backend = "gloo" if smoke else "nccl"
            cmd = [sys.executable, os.path.abspath(__file__), "--sharded", net, backend, str(world), res]
            # the smoke checks the sharding machinery, not the kernels again: the torch loops there
            env = {**os.environ, ENV: "torch"} if smoke else None
            try:
                r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10, left() - 20), env=env)
            except subprocess.TimeoutExpired:
                rec.note(f"sharded {net} ran past its time and was stopped", error="timeout")
                continue
            if r.returncode != 0 or not os.path.exists(res):
                tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
                rec.note(f"sharded {net} failed:\n{tail}", error=tail)
                continue
            secs = float(open(res).read())
        rec.figure(f"{net} auto, shared out over {world} {'CPU processes' if smoke else 'GPUs'}", secs, "s",
                   compare_with=f"{net} auto, batched by width")


def main() -> None:
    global BUDGET_S
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="folder for results.jsonl (default: gpu_check_<time>)")
    ap.add_argument("--cpu-smoke", action="store_true", help="every part on tiny shapes on CPU (interpreter)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all parts (default 420)")
    ap.add_argument("--fail-part", default=None, choices=PARTS, help="make this part raise (tests the error path)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--sharded", nargs=4, metavar=("NET", "BACKEND", "WORLD", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sharded:  # the processes of the sharded part
        net, backend, world, out = args.sharded
        sharded_main(net, backend, int(world), out)
        return
    BUDGET_S = args.budget
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; run with --cpu-smoke for the CPU version")
    if not triton_available():
        raise SystemExit("gpu_check: triton does not import")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"gpu_check: unknown --parts {unknown}; choose from {list(PARTS)}")
    device = torch.device("cpu" if smoke else "cuda")
    if smoke:
        os.environ[ENV] = "triton"  # the fused kernels, interpreted
    torch.set_float32_matmul_precision("high")  # what Lightning suggests: the solvers must not care
    rec = Recorder(args.out or f"gpu_check_{time.strftime('%Y%m%d_%H%M%S')}")
    print(f"# gpu_check: figures also in {rec.path}; budget {BUDGET_S:.0f} s", flush=True)
    hess: dict = {}
    plan = {  # name: (seconds budgeted, function, arguments)
        "machine": (1, part_machine, (device,)),
        "warmup": (5 if smoke else 90, part_warmup, (device, smoke, hess)),
        "networks": (5 if smoke else 60, part_networks, (device, smoke, hess)),
        "flush": (2 if smoke else 25, part_flush, (device, smoke)),
        "reference": (3 if smoke else 40, part_reference, (device, smoke)),
        "launches": (2 if smoke else 15, part_launches, (device, smoke)),
        "tests": (5 if smoke else 120, part_tests, (smoke,)),
        "sharded": (15 if smoke else 90, part_sharded, (smoke,)),
    }
    for name in PARTS:
        if name in parts:
            need, fn, fargs = plan[name]
            run_part(rec, name, need, fn, args.fail_part, *fargs)
    rec.part = "main"
    rec.figure("total", time.perf_counter() - T0, "s")


PARTS = ("machine", "warmup", "networks", "flush", "reference", "launches", "tests", "sharded")

if __name__ == "__main__":
    main()
