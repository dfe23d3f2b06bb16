"""Sphinx configuration of the lowrank_jax documentation.

The site is built with Sphinx from the docstrings: autodoc + napoleon (Google-style docstrings) for
the API, MyST for the Markdown pages, and the local extension `_ext/lowrank_docs.py` for the pages
generated from the registry and for the completeness checks. Build (warnings are errors):

    python -m sphinx -W --keep-going -b html docs /tmp/lowrank_jax_docs
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "docs", "_ext"))

project = "lowrank_jax"
author = "the lowrank_jax authors"
copyright = "2026, the lowrank_jax authors"  # pylint: disable=redefined-builtin

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
    "lowrank_docs",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "README.md", "_ext"]
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# Docstrings write code between single backticks, as Markdown does.
default_role = "code"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Dataclass fields listed under "Attributes:" are also autodoc members: render the section as
# fields, not as a second description of the same objects.
napoleon_use_ivar = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"undoc-members": False}
# Broken references to the package's own objects are errors; names from other libraries (jax,
# numpy, optax, flax, typing) are not resolved offline and are left as plain text, and so are
# private names (`_`-prefixed modules or objects, which the API reference leaves out).
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!lowrank_jax\.).*"), (r"py:.*", r"lowrank_jax\..*\._.*")]

html_theme = "alabaster"
html_title = "lowrank_jax"
