"""Product quantization (:class:`PQScheme`): codes of sub-vectors and one codebook per module; a ternary
(TTQ) weight is a 3-entry codebook with block size 1. This module knows only torch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from obc_lightning.formats.base import (
    MAX_PQ_CENTROIDS,
    PQ_KEYS,
    PQ_SCHEME,
    StorageScheme,
    check_config,
    is_int,
    packed_buffer,
    plain_buffer,
    pq_code_bits,
    rows_cols,
    weight_header,
)
from obc_lightning.formats.bits import STORAGE_DTYPES, dtype_name, pack_bits, unpack_bits

MATCH_ELEMENTS = 1 << 24  # sub-vector x centroid x entry products at a time (PQ codes from a weight)

@dataclass(repr=False, eq=False)
class PQScheme(StorageScheme):
    """Product quantization ("pq", :func:`~obc_lightning.solvers.pq.product_quantize`): sub-vectors of
    ``block_size`` consecutive inputs of a row replaced by entries of one codebook per module. A ternary
    module (TTQ) is a "pq" module with ``block_size`` 1 and the 3-entry codebook {0, +w_p, -w_n}.

    Buffers: ``weight_codes`` uint8, the (rows, J) sub-vector codes (J = d / block_size) in row-major order,
    packed at ``bits = ceil(log2 n_centroids)`` bits (``ceil(bits * rows * J / 8)`` bytes; so at most 256
    centroids); ``weight_codebook`` (n_centroids, block_size) in ``scale_dtype`` (float16 by default).

    Dequantization: ``W[r, j*b:(j+1)*b] = codebook[code[r, j]]`` (gathered in the codebook's dtype promoted
    to float32, then cast to the module's dtype: exact for a float16 codebook). A codebook is never
    rounded on export: it must be exactly representable in ``scale_dtype``.
    Size: ``ceil(bits * rows * J / 8) + n_centroids * block_size * (codebook entry bytes)``.

    As a format: the ``codebook`` (n_centroids, block_size); the codes are the rows of the codebook that
    the weight's sub-vectors equal.
    """

    codebook: Tensor
    block_size: int

    names: ClassVar = (PQ_SCHEME,)
    keys: ClassVar = PQ_KEYS

    @classmethod
    def check_fields(cls, config, where, cols):
        K, b, bits = config["n_centroids"], config["block_size"], config["bits"]
        if not is_int(K) or not 2 <= K <= MAX_PQ_CENTROIDS:
            raise ValueError(f"{where}: n_centroids must be an integer in [2, {MAX_PQ_CENTROIDS}], got {K!r}")
        if bits != pq_code_bits(K):
            raise ValueError(
                f"{where}: bits must be ceil(log2 n_centroids) = {pq_code_bits(K)} for n_centroids={K}, got {bits!r}"
            )
        if not is_int(b) or not 1 <= b <= cols or cols % b:
            raise ValueError(
                f"{where}: block_size must be an integer that divides the {cols} inputs per row of a weight of "
                f"shape {list(config['shape'])}, got {b!r}"
            )

    @classmethod
    def buffers(cls, config):
        rows, cols = rows_cols(config)
        b = config["block_size"]
        return {
            "weight_codes": packed_buffer(rows * (cols // b), config["bits"]),
            "weight_codebook": plain_buffer(STORAGE_DTYPES[config["scale_dtype"]], (config["n_centroids"], b)),
        }

    @classmethod
    def check_values(cls, config, tensors, where):
        if not torch.isfinite(tensors["weight_codebook"]).all():
            raise ValueError(f"{where}: weight_codebook contains NaN or Inf")
        K, bits = config["n_centroids"], config["bits"]
        if K < 2**bits:  # codes K ... 2**bits - 1 fit in the bits but name no centroid
            rows, cols = rows_cols(config)
            n = rows * (cols // config["block_size"])
            top = int(unpack_bits(tensors["weight_codes"], bits, n).max()) if n else 0
            if top >= K:
                raise ValueError(f"{where}: weight_codes holds code {top}, beyond the n_centroids={K} codebook entries")

    @classmethod
    def dequantize(cls, config, tensors, dtype):
        rows, cols = rows_cols(config)
        codebook = tensors["weight_codebook"]
        k = unpack_bits(tensors["weight_codes"], config["bits"], rows * (cols // config["block_size"])).long()
        compute = torch.promote_types(codebook.dtype, torch.float32)
        return codebook.to(compute)[k].to(dtype).view(config["shape"])

    @classmethod
    def layout(cls, config):
        return (
            f"a product-quantized weight of shape {config['shape']} (block_size={config['block_size']}, "
            f"n_centroids={config['n_centroids']}, {config['bits']}-bit codes)"
        )

    @classmethod
    def extra_repr(cls, config):
        return (
            f"scheme=pq, bits={config['bits']}, block_size={config['block_size']}, "
            f"n_centroids={config['n_centroids']}, codebook_dtype={config['scale_dtype']}"
        )

    @classmethod
    def pack(cls, config: Mapping, codes: Tensor, codebook: Tensor) -> dict[str, Tensor]:
        """Buffers from the (rows, J) codes and the stored codebook."""
        return {"weight_codes": pack_bits(codes.to(torch.int32), config["bits"]),
                "weight_codebook": codebook.contiguous()}

    # ------------------------------------------------------------------ the format
    @classmethod
    def from_results(cls, where, kind, weight, results, groups=1, scale_dtype="float16"):
        """(description, buffers) of a weight from its one PQResult (``codes``, ``codebook``,
        ``block_size``, ``n_centroids``), checked against it; a grouped conv's weight (out, in / g, kh, kw)
        is g stacked row blocks, as for scalars."""
        if len(results) != 1:
            raise ValueError(f"{where}: a product-quantized module takes one PQResult, got {len(results)} results")
        res = results[0]
        rows, cols = weight.shape[0], weight[0].numel()
        b, K = res.block_size, res.n_centroids
        cls._check_exportable(where, K, b, cols, weight.shape)
        codes, codebook = res.codes.detach().cpu(), res.codebook.detach().cpu()
        J = cols // b
        if (
            tuple(codes.shape) != (rows, J)
            or codes.is_floating_point()
            or codes.is_complex()
            or codes.dtype == torch.bool
            or tuple(codebook.shape) != (K, b)
            or not codebook.is_floating_point()
        ):
            raise ValueError(
                f"{where}: a PQResult with codes {codes.dtype} of shape {tuple(codes.shape)} and codebook "
                f"{codebook.dtype} of shape {tuple(codebook.shape)} does not fit its weight of shape "
                f"{tuple(weight.shape)} (integer codes of shape ({rows}, {J}) and a floating-point codebook of "
                f"shape ({K}, {b}) expected)"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= K):
            raise ValueError(f"{where}: codes must be in [0, {K - 1}] for n_centroids={K}")
        return cls(codebook, b)._encode(where, kind, weight, scale_dtype, codes.long())

    @staticmethod
    def _check_exportable(where, K, b, cols, shape):
        if isinstance(K, bool) or not isinstance(K, int) or not 2 <= K <= MAX_PQ_CENTROIDS:
            raise ValueError(
                f"{where}: n_centroids={K!r} cannot be exported: codes are bit-packed at 8 bits at most, so "
                f"n_centroids must be in [2, {MAX_PQ_CENTROIDS}]"
            )
        if isinstance(b, bool) or not isinstance(b, int) or b < 1 or cols % b:
            raise ValueError(
                f"{where}: block_size={b!r} does not divide the {cols} inputs per row of its weight of shape "
                f"{tuple(shape)}"
            )

    @classmethod
    def from_packed(cls, config, tensors, dtype):
        codebook = tensors["weight_codebook"]
        return cls(codebook.detach().to("cpu", torch.promote_types(codebook.dtype, torch.float32)),
                   config["block_size"])

    @property
    def n_centroids(self) -> int:
        return self.codebook.shape[0]

    def codes(self, where: str, weight: Tensor) -> Tensor:
        """(rows, J) long: the codebook row each sub-vector of ``weight`` equals (the first, if two rows
        are equal), compared in the weight's dtype; ValueError naming ``where`` if a sub-vector equals
        none.

        The nearest row by ||s - c||^2 = ||c||^2 - 2 s.c + ||s||^2 (one matrix product per chunk), then
        the equality checked entry by entry; only sub-vectors whose nearest row is not equal to them (a
        rounding near-tie between almost equal rows, or no match) are compared with every row."""
        rows, b = weight.shape[0], self.block_size
        sub = weight.detach().reshape(-1, b)
        book = self.codebook.to(device=sub.device, dtype=sub.dtype)
        compute = torch.promote_types(sub.dtype, torch.float32)
        bk = book.to(compute)
        norms = bk.square().sum(dim=1)
        out = torch.empty(sub.shape[0], dtype=torch.long, device=sub.device)
        step = max(1, MATCH_ELEMENTS // max(1, book.numel()))
        for i in range(0, sub.shape[0], step):
            out[i : i + step] = (norms - 2 * sub[i : i + step].to(compute) @ bk.T).argmin(dim=1)
        for j in (~(book[out] == sub).all(dim=1)).nonzero().flatten().tolist():
            eq = (book == sub[j]).all(dim=1)
            if not bool(eq.any()):
                r, c = divmod(j, sub.shape[0] // rows)
                raise ValueError(
                    f"{where}: its weight is not made of the entries of its recorded codebook: sub-vector {c} of row "
                    f"{r} (inputs {c * b} ... {c * b + b - 1}) is none of its {self.n_centroids} entries (was the "
                    "weight trained or changed after it was quantized?); quantize it again"
                )
            out[j] = int(eq.to(torch.uint8).argmax())
        return out.view(rows, -1)

    def describe(self, kind, weight, *, scale_dtype="float16", value_dtype="float16"):
        K = self.n_centroids
        return {**weight_header(kind, weight), "scheme": PQ_SCHEME, "bits": pq_code_bits(K),
                "block_size": self.block_size, "n_centroids": K, "scale_dtype": scale_dtype}

    def encode(self, where, kind, weight, *, scale_dtype="float16", value_dtype="float16"):
        return self._encode(where, kind, weight, scale_dtype, None)

    def _encode(self, where, kind, weight, scale_dtype, codes):
        W = weight.detach().cpu()
        codebook = self.codebook.detach().cpu()
        self._check_exportable(where, self.n_centroids, self.block_size, W[0].numel(), W.shape)
        if not torch.isfinite(codebook).all():
            raise ValueError(f"{where}: the codebook contains NaN or Inf")
        if codes is None:
            codes = self.codes(where, W)
        elif not torch.equal(codebook[codes].reshape(W.shape).to(W.dtype), W):
            raise ValueError(
                f"{where}: its weight is not codebook[codes] of the given PQResult (was the model changed after "
                "quantization? after fine-tuning the centroids, pass a result holding the updated codebook)"
            )
        stored = codebook.to(STORAGE_DTYPES[scale_dtype])
        if not torch.equal(stored.to(codebook.dtype), codebook):
            raise ValueError(
                f"{where}: scale_dtype={scale_dtype} cannot represent its {dtype_name(codebook.dtype)} codebook "
                "exactly; round the codebook to it first (product_quantize(..., codebook_dtype=torch.float16), the "
                f"default) or pass scale_dtype=torch.{dtype_name(codebook.dtype)}"
            )
        config = check_config(self.describe(kind, W, scale_dtype=scale_dtype), where)
        return config, self.pack(config, codes, stored)
