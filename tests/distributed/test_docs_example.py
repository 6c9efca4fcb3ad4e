"""The LocalCluster example of docs/distributed.md, run as a script in a fresh process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("dask.array")
pytest.importorskip("distributed")

DOC = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"
SECTION = "## A runnable example (LocalCluster)"


def test_local_cluster_example_runs():
    text = DOC.read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", len(SECTION))]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    error = float(re.search(r"max \|o - o_single\| = (\S+)", out.stdout).group(1))
    assert error < 1e-12
