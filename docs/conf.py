"""Sphinx configuration of cbn's documentation site (docs/): pages in MyST Markdown, the API reference from the
docstrings (autodoc, autosummary, numpydoc). Build: ``sphinx-build -W --keep-going -n docs docs/_build/html``
(``.ci/docs`` does that and runs the doctests); cbn must be installed (its compiled kernels are imported).
"""
import contextlib
import doctest
import io
import os
import sys
from pathlib import Path
from unittest import mock

from sphinx.util import logging

# `python -m sphinx` run from the checkout's root puts that folder first on sys.path, where cbn/ is the source without
# its compiled kernels: the build imports the installed cbn.
_root = Path(__file__).resolve().parent.parent
sys.path[:] = [str(_root / "docs")] + [p for p in sys.path if Path(p or ".").resolve() != _root]

import public_api  # noqa: E402

import cbn  # noqa: E402
import cbn.bench  # noqa: E402

project = "cbn"
author = "The cbn developers"
copyright = "The cbn developers"
release = version = cbn.__version__

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.intersphinx",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
templates_path = ["_templates"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# -- API reference -----------------------------------------------------------------------------------------------------
autosummary_generate = True
autodoc_default_options = {"members": False}
autodoc_preserve_defaults = True  # signatures show defaults as written (np.float32), not their repr
# The annotations (cbn is typed: py.typed) are for type checkers; the pages give the types in words, in numpydoc's
# Parameters and Returns sections, and show each function's own signature rather than its typing overloads.
autodoc_typehints = "none"
numpydoc_show_class_members = False  # the class template lists the members itself
numpydoc_class_members_toctree = False

# -- cross references --------------------------------------------------------------------------------------------------
# Nitpicky (-n): every reference to a cbn name must resolve. Third-party names (NumPy, PyTorch, Python's standard
# library) resolve through intersphinx, which needs their sites' inventories over the network: it is on where the
# site is published (Read the Docs sets READTHEDOCS=True) or with CBN_DOCS_INTERSPHINX=1. Offline (CI here has no
# network) those references render as plain names and are not checked; cbn's own still are.
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable", None),
    "torch": ("https://docs.pytorch.org/docs/stable", None),
}
if not (os.environ.get("READTHEDOCS") == "True" or os.environ.get("CBN_DOCS_INTERSPHINX") == "1"):
    intersphinx_mapping = {}
    nitpick_ignore_regex = [(r"py:.*", r"(numpy|torch)\..+")]

# -- doctests: the examples of the pages and the docstrings ------------------------------------------------------------
# Exception messages are compared too (Sphinx's default flags ignore their detail); long outputs may wrap.
doctest_default_flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE | doctest.DONT_ACCEPT_TRUE_FOR_1
doctest_global_setup = """
import numpy as np
import cbn
"""

# -- HTML --------------------------------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"cbn {release}"
html_theme_options = {
    "github_url": "https://github.com/cbn-project/cbn",
    "navbar_align": "left",
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_show_sourcelink = False
html_static_path = ["_static"]
html_css_files = ["cbn.css"]
# pages without sub-pages: no (empty) section navigation, the room goes to the content
html_sidebars = {page: [] for page in ("getting-started", "benchmarks", "changelog")}


def _write_bench_help(app):
    """docs/_generated/cbn-bench-help.txt: ``cbn-bench --help`` as argparse prints it (the benchmarks page includes
    it), so that the options are written once, in cbn/bench.py."""
    text = io.StringIO()
    with mock.patch.dict(os.environ, COLUMNS="72"), contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        cbn.bench.main(["--help"])
    out = Path(app.srcdir, "_generated", "cbn-bench-help.txt")
    out.parent.mkdir(exist_ok=True)
    if not out.exists() or out.read_text() != text.getvalue():
        out.write_text(text.getvalue())


def _check_public_names(app, env):
    """A warning (an error under -W) for each public name (docs/public_api.py) without an entry in the API
    reference."""
    for name in sorted(set(public_api.public_names()) - set(env.domains.python_domain.objects)):
        logging.getLogger(__name__).warning(f"public name {name} has no entry in the API reference (docs/api/)")


def setup(app):
    app.connect("builder-inited", _write_bench_help)
    app.connect("env-check-consistency", _check_public_names)
