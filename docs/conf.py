"""Sphinx configuration for the refattn documentation site.

Build (from the repository root, after ``pip install ".[docs]"``)::

    sphinx-build -W --keep-going -b html docs build/html
    sphinx-build -W --keep-going -b doctest docs build/doctest

The markdown pages are read with MyST; the API reference is generated from the
docstrings (numpydoc format) by autosummary.  Math is rendered by a MathJax copy
that ships inside the ``sphinx-mathjax-offline`` wheel, so the site needs no
network, neither to build nor to read.
"""

from __future__ import annotations

import os
import re
from importlib.metadata import distribution

import refattn

project = "refattn"
author = "refattn contributors"
copyright = "refattn contributors"
release = refattn.__version__
version = release

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "matplotlib.sphinxext.plot_directive",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# -- MyST: the markdown pages ------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# -- API reference -----------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
# A module page lists what its ``__all__`` exports, imported names included.
autosummary_ignore_module_all = False
# The signatures carry the type hints; the numpydoc "Parameters" sections say the shapes.
autodoc_typehints = "signature"
# Show the aliases of refattn.typing by name (``q: Array``, ``backend: Backend``), not
# expanded (``Any``, ``Literal['auto', ...]``).
autodoc_type_aliases = {name: name for name in ("Array", "Namespace", "Backend", "CausalAlign",
                                                 "Pullback", "VjpRule")}
# numpydoc would list every attribute and method of each class a second time, as a table
# without their docstrings; the class pages document their members with autodoc instead.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False

# ``sphinx-build -n`` also checks every cross-reference; NumPy's object inventory would need
# the network, so its types are taken as known.
nitpick_ignore = [("py:class", "numpy.ndarray")]

# -- Examples executed at build time -----------------------------------------------------
# ``sphinx-build -b doctest`` runs the ``{doctest}`` blocks of the pages under docs/
# (docs/examples.md); docstring examples are run by pytest (``--doctest-modules``), so
# the doctest builder does not run them a second time.
doctest_test_doctest_blocks = ""
doctest_global_setup = "import numpy as np\nimport refattn"
# The plot directive runs its code while the HTML is built and embeds the figure.
plot_include_source = True
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]
plot_rcparams = {"figure.figsize": (7.0, 3.2), "savefig.bbox": "tight"}

# -- HTML --------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"refattn {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "header_links_before_dropdown": 6,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
# Pages without sub-pages get no (empty) left navigation column.
html_sidebars = {page: [] for page in ("index", "conventions", "examples", "verify", "benchmarks")}
html_show_sourcelink = False

# MathJax 3 from the sphinx-mathjax-offline wheel: its ``static/`` folder holds
# ``mathjax/tex-chtml.js`` and the fonts; copying it into ``_static`` makes every page
# render its math without a CDN.
_mathjax_static = str(distribution("sphinx-mathjax-offline").locate_file("sphinx-mathjax-offline/static"))
if not os.path.isfile(os.path.join(_mathjax_static, "mathjax", "tex-chtml.js")):
    raise RuntimeError(f"no MathJax under {_mathjax_static}: pip install '.[docs]'")
html_static_path = ["_static", _mathjax_static]
html_css_files = ["refattn.css"]
mathjax_path = "mathjax/tex-chtml.js"


# -- Docstring shape legends -------------------------------------------------------------
# The docstrings write a parameter's type as a shape, e.g. ``q_t : array (*batch, H, D)``,
# where ``*batch`` means any number of leading batch axes.  reST reads that star as the
# start of emphasis; escape stars in the type part of numpydoc ``name : type`` lines
# (outside ``literals``) before numpydoc renders them.
_TYPE_LINE = re.compile(r"^(\s*[\w*][\w*, ]* : )(.*)$")


def _escape_stars(text: str) -> str:
    parts = text.split("``")
    parts[::2] = [p.replace("*", r"\*") for p in parts[::2]]   # even parts lie outside ``...``
    return "``".join(parts)


def _escape_shape_stars(app, what, name, obj, options, lines):
    for i, line in enumerate(lines):
        m = _TYPE_LINE.match(line)
        if m and "*" in m.group(2):
            lines[i] = m.group(1) + _escape_stars(m.group(2))


# Sphinx 9.0 prints an alias inside a union as ``TypeAliasForwardRef('Array') | None``;
# show it as ``Array | None`` like the alias elsewhere in the signature.
_ALIAS_REPR = re.compile(r"TypeAliasForwardRef\('([\w.]+)'\)")


def _unwrap_alias_reprs(app, what, name, obj, options, signature, return_annotation):
    def clean(text):
        return None if text is None else _ALIAS_REPR.sub(r"\1", text)

    return clean(signature), clean(return_annotation)


def setup(app):
    # Before numpydoc (priority 500) turns the sections into field lists.
    app.connect("autodoc-process-docstring", _escape_shape_stars, priority=400)
    app.connect("autodoc-process-signature", _unwrap_alias_reprs)
