r"""Runs one experiment: `python -m experiments.run --config configs/<x>.py[:arg] --workdir DIR`.

Thin on purpose (flax examples' `main.py`): flags here, logic in `lowrank_jax.train`, which colabs
import too. The config is locked, so `--config.field=value` may only set existing fields; an
unknown field is an error. `--overwrite` lets a workdir holding a different config be reused.
"""
import logging as py_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<x>.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, adapter).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Delete a run of a different config found in --workdir.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from lowrank_jax import train  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  if _OVERWRITE.value:
    with config.unlocked():
      config.overwrite = True
  logging.info("config:\n%s", config)
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as e:
    if os.environ.get("LOWRANK_JAX_TRACEBACK"):
      raise
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    print("(set LOWRANK_JAX_TRACEBACK=1 for the traceback)", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  py_logging.getLogger("absl").setLevel(py_logging.INFO)
  app.run(main)
