r"""Runs one experiment: `python -m experiments.run --config configs/<x>.py[:arg] --workdir DIR`.

Thin on purpose (flax examples' `main.py`): flags here, logic in `lowrank_jax.train`, which colabs
import too. The config is locked, so `--config.field=value` may only set existing fields; an
unknown field is an error that lists the valid names. `--overwrite` lets a workdir holding a
different config be reused. `--list` prints the configs with their args and the registered
methods, models and datasets.

`adapter.targets` (a list) is set with `--config.adapter.targets=REGEX` (one regex) or a list
literal, `--config.adapter.targets='["dense_0/kernel", "dense_1/kernel"]'`.

Bad input (unknown field, missing config file, a workdir that is a file or cannot be written)
ends with one `error: ...` line and exit status 1; `LOWRANK_JAX_TRACEBACK=1` shows the traceback.
Every log record goes to `DIR/run.log`; the terminal shows the progress bar, the results, warnings
and the log lines of `lowrank_jax` (third-party INFO logs and the config dump stay in the file).
A multi-process run (`config.distributed`, or the variables JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID) starts the same command in every process; process 0 writes the
log, metrics, adapter and results.
"""
import ast
import glob
import importlib.util
import logging as py_logging
import os
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<x>.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, adapter).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Delete a run of a different config found in --workdir.")
_REUSE_HOST_MEMORY = flags.DEFINE_bool(
    "reuse_host_memory", True, "Keep XLA:CPU's per-step scratch memory mapped between steps "
    "(lowrank_jax.host_memory; resident memory then stays at its peak).")
flags.DEFINE_bool("list", False, "Print the configs, their args and the registered methods, "
                  "models and datasets, then exit.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS_FLAG = "--config.adapter.targets="
LOG_FILE = "run.log"


class UsageError(ValueError):
  """A bad command line: reported as one line, before any work."""


def fail(message: str):
  """Prints `error: message` (one line) and exits with status 1."""
  print(f"error: {message}", file=sys.stderr)
  print("(set LOWRANK_JAX_TRACEBACK=1 for the traceback)", file=sys.stderr)
  sys.exit(1)


def config_files() -> list[str]:
  """The config files under `configs/` (those defining `get_config`), relative to the repo."""
  out = []
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    with open(path) as f:
      if "def get_config" in f.read():
        out.append(os.path.relpath(path, ROOT))
  return out


def args_line(path: str) -> str:
  """The `Args (after `:`): ...` paragraph of a config's docstring, on one line ("" if none)."""
  with open(os.path.join(ROOT, path)) as f:
    lines = f.read().splitlines()
  start = next((i for i, l in enumerate(lines) if l.startswith("Args (after")), None)
  if start is None:
    return ""
  end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
  return " ".join(l.strip() for l in lines[start:end])


def load_config(spec: str):
  """`get_config(arg)` of a `path[:arg]` config spec, loaded as the config flag loads it."""
  path, sep, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_run_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(*([arg] if sep else []))


def config_listing() -> str:
  """The configs (with the `Args` line of their docstring) and the registered names."""
  from lowrank_jax import data  # pylint: disable=g-import-not-at-top
  from lowrank_jax import models  # pylint: disable=g-import-not-at-top
  from lowrank_jax import registry  # pylint: disable=g-import-not-at-top
  lines = ["configs (--config configs/<name>.py[:arg=value,...]):"]
  lines += [f"  {path}  {args_line(path)}".rstrip() for path in config_files()]
  lines.append(f"methods: {', '.join(registry.list_methods())}")
  lines.append(f"models: {', '.join(models.list_models())}")
  lines.append(f"datasets: {', '.join(data.list_datasets())}")
  return "\n".join(lines)


def parse_targets(text: str) -> list:
  """`adapter.targets` from the command line: one regex, or a list literal of regexes."""
  if not text.lstrip().startswith(("[", "(")):
    return [text]
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    raise UsageError(f"--config.adapter.targets={text!r} is not a list literal of regexes "
                     f"({e}); give one regex or e.g. '[\"a/kernel\", \"b/kernel\"]'") from None
  if not all(isinstance(t, str) for t in value):
    raise UsageError(f"--config.adapter.targets={text!r}: every target must be a string regex")
  return list(value)


def unknown_field(config, argv: list) -> str | None:
  """The first `--config.<path>=` override naming a field `config` lacks, as a message listing
  the valid names at that level; None if every path exists."""
  for a in argv:
    if not a.startswith("--config."):
      continue
    path = a[len("--config."):].split("=", 1)[0]
    node, walked = config, []
    for key in path.split("."):
      if not hasattr(node, "keys"):
        break
      if key not in node:
        where = f" under {'.'.join(walked)!r}" if walked else ""
        return f"unknown config field {path!r}; valid names{where}: {sorted(node.keys())}"
      node, walked = node[key], walked + [key]
  return None


def config_spec_of(argv: list) -> str | None:
  """The `path[:arg]` value of `--config` in `argv` (None if absent)."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(argv: list) -> list:
  """absl's flag parsing, with bad config input reported as one line (see `fail`)."""
  if "--list" in argv:
    print(config_listing())
    sys.exit(0)
  targets = [a[len(TARGETS_FLAG):] for a in argv if a.startswith(TARGETS_FLAG)]
  argv = [a for a in argv if not a.startswith(TARGETS_FLAG)]
  sys.argv[:] = [a for a in sys.argv if not a.startswith(TARGETS_FLAG)]  # config_flags reads it
  spec = config_spec_of(argv)
  if spec is not None and not os.path.isfile(spec.partition(":")[0]):
    fail(f"config file {spec.partition(':')[0]!r} not found; configs: {config_files()}")
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    if os.environ.get("LOWRANK_JAX_TRACEBACK"):
      raise
    try:
      message = unknown_field(load_config(spec), argv) if spec else None
    except Exception as load_error:  # pylint: disable=broad-except
      e, message = load_error, None
    fail(message or f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
  if targets:
    try:
      _CONFIG.value.adapter.targets = parse_targets(targets[-1])
    except UsageError as e:
      fail(str(e))
  return rest


def check_workdir(workdir: str) -> None:
  """Creates `workdir` if needed and checks that a file can be written in it.

  Raises:
    UsageError: the path is a file, or the directory cannot be created or written.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UsageError(f"--workdir {workdir!r} is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise UsageError(f"--workdir {workdir!r} cannot be written: {e.strerror}") from None


def is_library_or_warning(record: py_logging.LogRecord) -> bool:
  """Whether a log record belongs on the terminal: a warning or worse, or logged by `lowrank_jax`
  (not by a third-party library, nor the config dump of this script)."""
  return (record.levelno >= py_logging.WARNING
          or record.pathname.startswith(os.path.join(ROOT, "lowrank_jax") + os.sep))


def log_to_file(workdir: str) -> None:
  """Sends every log record (third-party INFO included) to `workdir/run.log`; the terminal keeps
  what `is_library_or_warning` passes."""
  handler = py_logging.FileHandler(os.path.join(workdir, LOG_FILE))
  handler.setFormatter(py_logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  root = py_logging.getLogger()
  root.addHandler(handler)
  root.setLevel(py_logging.INFO)
  logging.get_absl_handler().addFilter(is_library_or_warning)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  try:
    check_workdir(_WORKDIR.value)
  except UsageError as e:
    if os.environ.get("LOWRANK_JAX_TRACEBACK"):
      raise
    fail(str(e))
  if _REUSE_HOST_MEMORY.value:   # before JAX starts its CPU client
    from lowrank_jax import host_memory  # pylint: disable=g-import-not-at-top
    host_memory.reuse_host_memory()
  import jax  # pylint: disable=g-import-not-at-top
  from lowrank_jax import sharding  # pylint: disable=g-import-not-at-top
  try:   # a multi-process run (config.distributed or JAX_* variables) starts before JAX is used
    sharding.initialize_distributed(config.get("distributed", None))
  except ValueError as e:
    fail(str(e))
  if jax.process_index() == 0:   # process 0 writes the log; the others print warnings only
    log_to_file(_WORKDIR.value)
  else:
    logging.set_verbosity(logging.WARNING)
  from lowrank_jax import train  # pylint: disable=g-import-not-at-top
  if _OVERWRITE.value:
    with config.unlocked():
      config.overwrite = True
  logging.info("config:\n%s", config)
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as e:
    if os.environ.get("LOWRANK_JAX_TRACEBACK"):
      raise
    fail(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
