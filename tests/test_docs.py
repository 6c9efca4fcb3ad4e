"""The documentation site's API reference covers the whole public API."""

from __future__ import annotations

import re
from pathlib import Path

import refattn

API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.rst"


def _autosummary_entries(text: str) -> set[str]:
    """Names listed in the ``.. autosummary::`` blocks of an reST page."""
    names: set[str] = set()
    for block in re.findall(r"^\.\. autosummary::\n((?:[ \t]+.*\n|\n)+)", text, re.M):
        for line in block.splitlines():
            entry = line.strip()
            if entry and not entry.startswith(":"):
                names.add(entry.lstrip("~"))
    return names


def test_api_page_lists_every_public_name():
    listed = _autosummary_entries(API_PAGE.read_text())
    public = set(refattn.__all__) - {"__version__"}
    assert sorted(public - listed) == []


def test_autosummary_parser_sees_entries_and_skips_options():
    text = ".. autosummary::\n   :toctree: generated\n\n   sdpa\n   ~verify.golden\n\nProse\n"
    assert _autosummary_entries(text) == {"sdpa", "verify.golden"}
