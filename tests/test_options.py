"""Issue 32, item 3: every option is visible -- in the signatures (help(), IDE completion), in the
docstrings, as LightningCLI flat flags, and in docs/options.md -- all generated from the configuration
dataclasses, so none of them lists the fields by hand."""

import importlib.util
import inspect
import pydoc
from pathlib import Path

import pytest

from obc_lightning import compress_model
from obc_lightning.callback import OBCPrune, OBCQuantize
from obc_lightning.config import CompressionConfig, QuantizationConfig, flat_options

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("entry, sections, left_out", [
    (OBCQuantize, None, ()),
    (OBCPrune, None, ("bits",)),
    (compress_model, ("quantization", "calibration"), ("calibration_batches",)),  # the positional batches
])
def test_every_option_is_in_the_signature_with_its_type_and_default(entry, sections, left_out):
    params = inspect.signature(entry).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    options = [o for o in flat_options(sections) if o.name not in left_out]
    assert len(options) > 20
    for o in options:
        p = params[o.name]
        if o.name not in ("bits", "sparsity", "n_m"):  # the positional ones keep their own defaults
            assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default == o.default, o.name
        assert p.annotation is not inspect.Parameter.empty and not isinstance(p.annotation, str), o.name
    text = pydoc.render_doc(entry, renderer=pydoc.plaintext)
    assert "group_size: int | None = None" in text  # the signature help() prints
    assert "max_memory (int | dict[str, int] | None, default None): one memory budget" in text  # the docstring


def test_flat_flags_and_yaml_in_lightning_cli(tmp_path):
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    def callback(*args):
        cli = LightningCLI(BoringModel, BoringDataModule, run=False, args=list(args))
        (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, OBCQuantize)]
        return cb

    cb = callback("--trainer.callbacks+=obc_lightning.OBCQuantize", "--trainer.callbacks.bits=3",
                  "--trainer.callbacks.group_size=32", "--trainer.callbacks.n_m=[2, 4]",
                  "--trainer.callbacks.finetune=ste", "--trainer.callbacks.calibration_batches=2",
                  "--trainer.callbacks.export_path=m.safetensors")
    assert cb.config == CompressionConfig.from_flat("x", bits=3, group_size=32, n_m=(2, 4), finetune="ste",
                                                    calibration_batches=2, export_path="m.safetensors")
    cb = callback("--trainer.callbacks+=obc_lightning.OBCPrune", "--trainer.callbacks.sparsity=0.5")
    assert type(cb) is OBCPrune and cb.config.quantization.sparsity == 0.5 and cb.config.quantization.bits is None
    # the YAML form: LightningCLI passes every flat keyword at its default beside config; they are ignored
    yaml = tmp_path / "c.yaml"
    yaml.write_text("trainer:\n  callbacks:\n    - class_path: obc_lightning.OBCQuantize\n      init_args:\n"
                    "        config:\n          quantization: {bits: 2, group_size: 16}\n")
    cb = callback("--config", str(yaml))
    assert cb.config == CompressionConfig(quantization=QuantizationConfig(bits=2, group_size=16))
    with pytest.raises(ValueError, match="give config=... or flat keywords \\(group_size\\), not both"):
        OBCQuantize(config=cb.config, group_size=8)


def test_options_page_matches_the_dataclasses():
    spec = importlib.util.spec_from_file_location("gen_options", ROOT / "docs" / "gen_options.py")
    gen_options = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_options)
    page = (ROOT / "docs" / "options.md").read_text()
    assert page == gen_options.render(), "docs/options.md is stale: run python docs/gen_options.py"
    assert all(f"| `{o.name}` |" in page for o in flat_options())
