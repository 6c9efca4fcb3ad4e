"""Execute the Python code blocks of docs/verify.md, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")
pytest.importorskip("transformers", reason="docs/verify.md runs the Hugging Face adapters")

DOC = Path(__file__).resolve().parents[2] / "docs" / "verify.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def test_verify_md_examples_run():
    blocks = BLOCK.findall(DOC.read_text())
    assert len(blocks) >= 8
    namespace = {"__name__": "verify_md"}
    for number, block in enumerate(blocks):
        try:
            exec(compile(block, f"{DOC.name} block {number}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"docs/verify.md code block {number} failed:\n{block}") from exc
