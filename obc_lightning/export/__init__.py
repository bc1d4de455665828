"""Packed export: quantized and pruned models in safetensors, loaded back without pickle and without a
Trainer.

The package is split by direction: :mod:`~obc_lightning.export.write` (a compressed model -> packed tensors
-> a checksummed file, or packed modules in memory: :func:`save_quantized`, :func:`pack_model`) and
:mod:`~obc_lightning.export.read` (a file -> verified tensors -> the model: :func:`load_quantized`,
:func:`read_metadata`, :func:`prepare_for_load`, :func:`unpack_model`), with the file's identity and
checksums in :mod:`~obc_lightning.export.file`. What each module's tensors are, their sizes, checks and
dequantization belong to its storage scheme (:mod:`obc_lightning.formats.schemes`); what a compressed
module carries so that no report is needed, to :mod:`obc_lightning.formats.record`.

File layout (safetensors; every key is the one the packed model's ``state_dict`` uses):

- per scalar-quantized module ``m`` (scheme "affine" / "symmetric"): ``m.weight_codes`` (uint8, codes of
  ``weight.reshape(out, -1)`` row-major, bit-packed by :func:`obc_lightning.formats.bits.pack_bits`),
  ``m.weight_scales`` ((out, n_groups), float16 by default), ``m.weight_zeros`` ((out, n_groups) uint8
  integer zero points);
- for a module ``compress_model(..., n_m=(N, M))`` pruned and quantized, or with
  ``save_quantized(..., n_m=(N, M))``, per scalar module ``m`` instead: ``m.weight_codes`` (the codes
  of exactly N entries per group of M inputs -- the kept weights, padded with zeros -- bit-packed at
  ``bits``), ``m.weight_positions`` (each entry's position 0 ... M-1 in its group, bit-packed at
  ceil(log2 M) bits), ``m.weight_scales``, ``m.weight_zeros``; groups, entry order and dequantization in
  :mod:`obc_lightning.formats.schemes`;
- per product-quantized module ``m`` (scheme "pq", :func:`obc_lightning.solvers.pq.product_quantize`):
  ``m.weight_codes`` (uint8, the (out, J) sub-vector codes row-major, J = in * kh * kw / block_size,
  bit-packed at bits = ceil(log2 n_centroids); at most 256 centroids) and ``m.weight_codebook``
  ((n_centroids, block_size), float16 by default: ``scale_dtype`` names its dtype too); the weight is
  ``codebook[codes]`` reshaped to the weight's shape;
- per DiffQ module ``m`` (scheme "mixed", :class:`obc_lightning.grids.MixedResult`): ``m.weight_codes``
  (the codes of each bit width in turn, bit-packed at that width), ``m.weight_bits`` (every group's
  width, bit-packed), ``m.weight_range`` ((out, 2) row minima and maxima, float16 by default); a
  ternary module (TTQ) is a "pq" module with ``block_size`` 1 and the codebook {0, +w_p, -w_n};
- per pruned float module ``m`` (scheme "sparse": pruned by ``compress_model(..., bits=None)``, or
  ``save_quantized(..., sparse=...)``), the kept weights in ``value_dtype`` (float16 by default):
  with ``n_m=(N, M)`` ``m.weight_values`` (exactly N values per group of M inputs -- the non-zeros,
  padded with zeros -- in the entry order of the N:M codes) and ``m.weight_positions`` (as above);
  without, ``m.weight_mask`` (1 bit per weight of ``weight.reshape(-1)``, set for the stored ones) and
  ``m.weight_values`` (the non-zero weights, row-major);
- every other entry of ``model.state_dict()`` (biases, unquantized weights, BatchNorm statistics) at
  its own dtype and full precision;
- string metadata: ``format`` = "obc_lightning", ``format_version`` = "2", ``library_version``,
  ``sha256`` (below), and ``modules``: JSON ``{name: {kind, bits, group_size, shape, scheme,
  scale_dtype, dtype}}`` for scalar modules (plus ``n_m: [N, M]`` for N:M-sparse storage; absent:
  dense), ``{name: {kind, scheme: "pq", bits, block_size, n_centroids, shape, scale_dtype, dtype}}`` for
  product-quantized ones, ``{name: {kind, scheme: "sparse", shape, value_dtype, dtype, n_m: [N, M] |
  nnz}}`` for sparse ones, ``{name: {kind, scheme: "mixed", shape, group_size, min_bits, max_bits,
  bit_counts, scale_dtype, dtype}}`` for DiffQ ones (sizes and layouts of every scheme in
  :mod:`obc_lightning.formats.schemes`).

Size (each scheme's size formula, :meth:`obc_lightning.formats.schemes.StorageScheme.payload_nbytes`,
the one ``compress_model``'s report uses too): sum over scalar modules of ceil(bits * numel / 8) + rows *
n_groups * (scale bytes + 1) (N:M: ceil(bits * numel * N / M / 8) + ceil(ceil(log2 M) * numel * N / M / 8)
+ the same scales / zeros), over PQ modules of ceil(bits * rows * J / 8) + n_centroids * block_size *
(codebook entry bytes), over sparse modules of numel * N / M * (value bytes) + ceil(ceil(log2 M) * numel
* N / M / 8) (N:M; 2:4 with float16 values: 9 bits per weight) or ceil(numel / 8) + nnz * (value bytes)
(bitmask), plus the other tensors, plus the safetensors header (JSON, a few hundred bytes per module).

Precision of the loaded weight: ``W = float(s) * (code - z)`` with the *stored* scale s. With the default
``scale_dtype=torch.float16`` the loaded weights differ from the in-memory result of ``compress_model``
(fp32 scales) by the fp16 rounding of each scale: a relative error of at most 2**-11 per row / group,
far below the quantization step. ``scale_dtype=torch.float32`` gives a bit-exact round trip of an fp32
(or fp16 / bf16) model at 2 more bytes per scale. A PQ codebook is never rounded on export: it must be
exactly representable in ``scale_dtype`` (``product_quantize`` rounds it to float16 by default), so a PQ
module always round-trips bit-exactly. A sparse weight loads as its weight rounded to ``value_dtype``
(``value_dtype=torch.float32``: bit-exact for an fp32, fp16 or bf16 model). Either way, loading the same
file always gives the same bits, and ``QuantizedLinear`` / ``QuantizedConv2d`` compute exactly the
weights that ``load_quantized`` writes into a dense model.

Integrity: ``sha256`` is canonical JSON (sorted keys, no spaces) mapping every tensor's name to the
SHA-256 of ``[dtype, shape]`` as canonical JSON (e.g. ``["F16",[8,1]]``) followed by its raw bytes
(:func:`~obc_lightning.export.file.tensor_digest`), and ``"__metadata__"`` to the SHA-256 of the other
metadata entries as canonical JSON (:func:`~obc_lightning.export.file.metadata_digest`). Every digest is
verified on load before anything else is read from the file: a changed bit anywhere (a tensor, a shape,
a name, the metadata, the checksums) is refused with a ``ValueError`` naming the file and the tensor.
Files of format_version "1" (no checksums; same layout otherwise) still load, with an
:class:`UnverifiedFileWarning`. On load, and before any file is written, the packed tensors are checked:
scales finite and > 0, codebooks and sparse values finite, DiffQ ranges finite with lo <= hi, codes
within their ranges (:func:`obc_lightning.formats.schemes.check_packed_tensors`).

Determinism: the same model and arguments give the same bytes
(:func:`~obc_lightning.export.write.write_file`: canonical header, tensors in a fixed order, no
timestamps).

Safety: no pickle (safetensors only); every check on the file and on the model happens before the first
weight is written, and each failure is a ``ValueError`` that names the file, the module or the tensor;
writes go to a temporary file in the target directory, fsync-ed, then ``os.replace``-d into place.

Lightning checkpoints of a model with packed modules (after :func:`pack_model`) hold the packed buffers
and each module's description as its ``_extra_state``. Loading weights needs the packed modules in place
first; in the LightningModule::

    def on_load_checkpoint(self, checkpoint):
        obc_lightning.export.prepare_for_load(self, checkpoint)

(Lightning calls it before ``load_state_dict``, both in ``load_from_checkpoint`` and in
``trainer.fit/validate/test(ckpt_path=...)``), or call ``prepare_for_load(model, torch.load(path, weights_only=True))``
yourself before ``model.load_state_dict``.
"""


from obc_lightning.export.file import (
    CHECKSUM_KEY,
    FILE_FORMAT,
    FORMAT_VERSION,
    METADATA_DIGEST,
    metadata_digest,
    tensor_digest,
)
from obc_lightning.export.read import (
    UnverifiedFileWarning,
    load_checkpoint_formats,
    load_quantized,
    prepare_for_load,
    read_file,
    read_metadata,
    theoretical_bytes,
    unpack_model,
)
from obc_lightning.export.write import pack_model, packed_entries, save_quantized, write_file

__all__ = [
    "CHECKSUM_KEY",
    "FILE_FORMAT",
    "FORMAT_VERSION",
    "METADATA_DIGEST",
    "UnverifiedFileWarning",
    "load_checkpoint_formats",
    "load_quantized",
    "metadata_digest",
    "pack_model",
    "packed_entries",
    "prepare_for_load",
    "read_file",
    "read_metadata",
    "save_quantized",
    "tensor_digest",
    "theoretical_bytes",
    "unpack_model",
    "write_file",
]
