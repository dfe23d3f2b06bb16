"""The documentation site builds from the docstrings without a single warning.

`sphinx-build -W` fails on broken references, on docstring markup errors, on a public function or
class without a docstring or missing from the API reference, and on a registered method without
its page (checks in `docs/_ext/lowrank_docs.py`).
"""
import os
import subprocess
import sys

from lowrank_jax import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def test_every_registered_method_has_a_page():
  missing = [name for name in registry.list_methods()
             if not os.path.exists(os.path.join(DOCS, "methods", f"{name}.md"))]
  assert not missing, f"registered methods without docs/methods/<name>.md: {missing}"


def test_docs_build_without_warnings(tmp_path):
  warnings = tmp_path / "warnings.txt"
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-E", "-b", "html",
       "-w", str(warnings), DOCS, str(tmp_path / "html")],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, (warnings.read_text() if warnings.exists() else "") + proc.stderr
  for page in ("index", "installation", "contract", "implicit", "runner", "results", "api",
               "methods/lora", "methods/corda"):
    assert (tmp_path / "html" / f"{page}.html").exists(), page
  lora_page = (tmp_path / "html" / "methods" / "lora.html").read_text()
  # The registry facts table: LoRA's measured count on the 128x64 reference kernel, r(d_in + d_out).
  assert "768 (measured at build time)" in lora_page
