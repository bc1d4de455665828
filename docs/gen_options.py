"""Write docs/options.md from the configuration dataclasses (obc_lightning/config.py).

    python docs/gen_options.py           # rewrite docs/options.md
    python docs/gen_options.py --check   # exit 1 if the committed page differs (tests/test_options.py)

Every row is read from the dataclasses (flat keyword, type, default, meaning), so the page cannot drift
from the code: the test fails until the page is regenerated.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PAGE = Path(__file__).with_name("options.md")

INTRO = """\
# Options

Every option of `OBCQuantize`, `OBCPrune` and `compress_model`, generated from the configuration
dataclasses in `obc_lightning/config.py` by `docs/gen_options.py` (a test checks that this page is
current). Each is a flat keyword (`OBCQuantize(bits=3, group_size=128)`), a LightningCLI flag
(`--trainer.callbacks.group_size=128`), and a field of the dataclass named in the last column
(`OBCQuantize(config=CompressionConfig(quantization=QuantizationConfig(bits=3, group_size=128)))`, the
form a LightningCLI YAML uses). `compress_model` takes the *quantization* and *calibration* options;
`OBCPrune` takes all of them but `bits`. Bad values are refused at construction with an error naming
the keyword as you wrote it.
"""

TITLES = {
    "quantization": "Quantization: what the modules become",
    "calibration": "Calibration: how the Hessians are collected",
    "finetune": "Fine-tuning (callback only)",
    "export": "Export (callback only)",
    "reporting": "Reporting (callback only)",
    "": "Other (callback only)",
}
CLASSES = {"quantization": "QuantizationConfig", "calibration": "CalibrationConfig", "finetune": "FinetuneConfig",
           "export": "ExportConfig", "reporting": "ReportingConfig", "": "CompressionConfig"}


def _cell(text: str) -> str:
    """Docstring markup as Markdown in one table cell: reST ``code`` -> `code`, roles dropped, pipes escaped."""
    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: f"`{m.group(1).split('.')[-1]}`", text)
    text = text.replace("``", "`")
    return text.replace("|", "\\|")


def render() -> str:
    from obc_lightning.config import flat_options

    out = [INTRO.rstrip("\n")]
    section = None
    for o in flat_options():
        if o.section != section:
            section = o.section
            out += ["", f"## {TITLES[section]}", "", "| option | type | default | meaning | dataclass field |",
                    "|---|---|---|---|---|"]
        field = f"`{CLASSES[section]}.{o.field}`"
        out.append(f"| `{o.name}` | `{_cell(o.type_text)}` | `{o.default!r}` | {_cell(o.doc)} | {field} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if PAGE.read_text() == text else 1)
    PAGE.write_text(text)
