"""Every code block of the README runs: Python blocks in order in one namespace, shell blocks by what they name."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
CI = README.parent / ".ci" / "run"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), re.S | re.M)


def test_readme_fits_on_a_few_screens():
    assert len(README.read_text().splitlines()) <= 300


def test_the_python_blocks_run_in_order(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")  # the deployment block runs the exported model
    monkeypatch.chdir(tmp_path)  # the blocks write their files here
    namespace: dict = {"__name__": "readme"}
    code = blocks("python")
    assert len(code) >= 3
    for i, block in enumerate(code[1:], start=1):  # the first is the one-line use, shown without a model
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)


def test_the_shell_blocks_are_the_ones_ci_and_the_tests_run():
    shell = "\n".join(blocks("bash"))
    ci = CI.read_text()
    command = 'python -m pytest -q tests -m "not slow" -n auto'
    assert command in shell and command in ci and "python -m pytest -q tests -m slow" in ci
    assert "pip install torch==2.13.0" in shell and "torch==2.13.0" in ci
    assert "python examples/quickstart.py" in shell  # run by tests/test_examples.py
    assert "mkdocs build --strict" in shell
