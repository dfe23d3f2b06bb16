"""Log capture shared by the reliability tests."""
import contextlib
import logging


@contextlib.contextmanager
def warnings_logged():
  """Like `assertLogs(level="WARNING")`: the WARNING+ records on the root logger, as
  "LEVEL:logger:message" lines; fails if there were none."""
  lines = []

  class _Collect(logging.Handler):
    def emit(self, record):
      lines.append(f"{record.levelname}:{record.name}:{record.getMessage()}")

  root = logging.getLogger()
  handler = _Collect(logging.WARNING)
  old_level = root.level
  root.addHandler(handler)
  root.setLevel(logging.WARNING)
  try:
    yield lines
  finally:
    root.removeHandler(handler)
    root.setLevel(old_level)
  assert lines, "no logs of level WARNING or higher triggered on root"
