"""The documentation site builds offline with warnings as errors (mkdocs --strict: broken links and
anchors, pages missing from the nav, docstrings mkdocstrings cannot render), and its API reference
covers every public name."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_api_reference_covers_every_public_name():
    import obc_lightning

    documented = set(re.findall(r"^::: obc_lightning\.(?:callback\.)?(\w+)$", (ROOT / "docs" / "api.md").read_text(),
                                re.M))
    assert documented == set(obc_lightning.__all__)


def test_site_builds_strictly(tmp_path):
    for package in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(package, reason='the docs extra: pip install "obc_lightning[docs]"')
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "api" / "index.html").read_text().count('class="doc doc-heading"') >= 50
