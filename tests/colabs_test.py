"""Every colab runs top to bottom in its runlocal form (code cells executed in order)."""
import glob
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb")))


def test_colabs_exist_and_are_paired():
  assert NOTEBOOKS
  for nb in NOTEBOOKS:
    assert os.path.exists(nb[:-len(".ipynb")] + ".md"), f"{nb} has no jupytext .md pair"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_colab_runs(path, monkeypatch, tmp_path):
  monkeypatch.setenv("LOWRANK_JAX_RUNLOCAL", "1")
  monkeypatch.chdir(ROOT)
  cells = json.load(open(path))["cells"]
  for cell in cells:
    assert not cell.get("outputs"), f"{path}: outputs must be stripped (nbstripout)"
  namespace = {"__name__": "__colab__"}
  for i, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
    src = "".join(cell["source"])
    exec(compile(src, f"{os.path.basename(path)}[code cell {i}]", "exec"), namespace)
