"""Test helper: rewrite a saved safetensors file with edited tensors or metadata (corrupted-file tests)."""

import json

from safetensors import safe_open

from obc_lightning.export import CHECKSUM_KEY, write_file


def rewrite(path, tensors_fn=None, modules_fn=None, meta_fn=None):
    """Load ``path``, let ``tensors_fn(tensors)``, ``modules_fn(modules)`` (the parsed ``modules`` JSON)
    and ``meta_fn(metadata)`` edit it in place, in that order, and save it back with fresh checksums
    (as a writer that produced wrong content would: the checks behind the checksums are under test).
    A file without checksums (format_version 1) is written back without them."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    signed = CHECKSUM_KEY in meta
    if tensors_fn:
        tensors_fn(tensors)
    if modules_fn:
        modules = json.loads(meta["modules"])
        modules_fn(modules)
        meta["modules"] = json.dumps(modules)
    if meta_fn:
        meta_fn(meta)
    if signed:
        write_file(str(path), tensors, meta)
    else:
        from safetensors.torch import save_file

        save_file(tensors, path, metadata=meta)
