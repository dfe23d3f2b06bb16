"""Sphinx extension of the lowrank_jax documentation: pages generated from the code, and checks.

Directives:
  `method-facts NAME`: what the registry knows about method NAME (its `MethodFacts`, what the
    generic config knob `rank` means, the trainable-parameter count on a reference layer measured
    by running the method's `init`), then the method module's docstring and its factory's
    signature and docstring (autodoc).
  `api-reference`: an `automodule` section for every public module of the package (found by
    walking it, so a new module is documented without editing the docs).

Checks (Sphinx warnings, so `sphinx-build -W` fails on them):
  * every public function and class of every public module (its `__all__`, else those defined
    there whose names do not start with `_`; every one `lowrank_jax` exports) has a docstring and
    is documented;
  * every registered method has its page `methods/NAME` and every method page names a registered
    method.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

LOGGER = logging.getLogger(__name__)
PACKAGE = "lowrank_jax"
# The reference layer the parameter counts are measured on, and the generic knob's value there.
REFERENCE_SHAPE = (128, 64)
REFERENCE_RANK = 4


def public_modules() -> list[str]:
  """`lowrank_jax` and its submodules whose dotted names have no `_`-prefixed part, sorted."""
  package = importlib.import_module(PACKAGE)
  names = [PACKAGE]
  for info in pkgutil.walk_packages(package.__path__, PACKAGE + "."):
    if not any(part.startswith("_") for part in info.name.split(".")):
      names.append(info.name)
  return sorted(names)


def public_names(module_name: str) -> list[str]:
  """The public API of `module_name`: its `__all__` when it has one; for the package itself every
  non-module name it exports; else the functions and classes it defines whose names do not start
  with `_`."""
  module = importlib.import_module(module_name)
  if hasattr(module, "__all__"):
    return sorted(module.__all__)
  out = []
  for name, obj in vars(module).items():
    if name.startswith("_") or inspect.ismodule(obj):
      continue
    if module_name == PACKAGE:
      if callable(obj):
        out.append(name)
    elif (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == module_name:
      out.append(name)
  return sorted(out)


def _reference_count(name: str, facts) -> str:
  """Trainable parameters of method `name` on one `REFERENCE_SHAPE` dense kernel, measured from
  the shapes its `init` returns (`jax.eval_shape`). A method that needs calibration statistics
  runs `init` for real (its damping loop is eager), on the statistics of random inputs."""
  import jax
  import numpy as np
  import lowrank_jax as lj
  from lowrank_jax import calibrate, registry
  adapter = registry.configured_adapter(name, REFERENCE_RANK, r"dense/kernel", total_steps=10)
  if facts.needs_stats:
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(4 * REFERENCE_SHAPE[0], REFERENCE_SHAPE[0]))
    stats = {"dense/kernel": calibrate.CalibStats(
        cov=np.float32(inputs.T @ inputs / len(inputs)), count=np.float32(len(inputs)))}
    params = {"dense": {"kernel": np.float32(rng.normal(size=REFERENCE_SHAPE))}}
    _, state = adapter.init(jax.random.key(0), params, stats)
  else:
    params = {"dense": {"kernel": jax.ShapeDtypeStruct(REFERENCE_SHAPE, np.float32)}}
    state = jax.eval_shape(lambda p: adapter.init(jax.random.key(0), p)[1], params)
  return f"{lj.count_params(state):,}"


class MethodFacts(SphinxDirective):
  """`method-facts NAME`: the registry's facts, a measured count, the module and factory docs."""
  required_arguments = 1

  def run(self):
    from lowrank_jax import registry
    name = self.arguments[0]
    if name not in registry.METHODS:
      LOGGER.warning(f"method-facts: {name!r} is not a registered method "
                     f"({registry.list_methods()})", location=self.get_location())
      return []
    facts = registry.facts(name)
    self.env.app.lowrank_method_pages[name] = self.env.docname
    module = registry.METHODS[name]
    factory = f"{facts.factory.__module__}.{facts.factory.__qualname__}"
    rank_doc = " ".join(inspect.getdoc(facts.config_kwargs).split()) \
        if facts.config_kwargs.__doc__ else ""
    allocation = "yes (ranks change during training)" if facts.rank_allocation else "no"
    rows = [
        ("registry name", f"`{name}`"),
        ("factory", f"{{py:func}}`{factory}`"),
        ("the generic config knob `rank`", rank_doc or "(not documented)"),
        (f"trainable parameters on one {REFERENCE_SHAPE[0]}×{REFERENCE_SHAPE[1]} kernel, "
         f"`rank={REFERENCE_RANK}`", _reference_count(name, facts) + " (measured at build time)"),
        ("needs calibration statistics", "yes" if facts.needs_stats else "no"),
        ("rank allocation", allocation),
        ("residual base (`W_res` replaces the targeted weights)",
         "yes" if facts.residual_init else "no"),
        ("exports as a PEFT LoRA", "yes" if facts.peft_exportable else "no"),
    ]
    table = [":::{list-table}", ":header-rows: 0", ""]
    for key, value in rows:
      table += [f"* - {key}", f"  - {value}"]
    table.append(":::")
    text = ["## Registry facts", "", *table, "", "## The method (module docstring)", "",
            "```{eval-rst}", f".. automodule:: {module}", "   :no-index:", "", "```", "",
            "## Factory and its knobs", "", "```{eval-rst}", f".. autofunction:: {factory}",
            "   :no-index:", "", "```", ""]
    container = nodes.section()
    container.document = self.state.document
    self.state.nested_parse(StringList(text, source=f"<method-facts {name}>"), 0, container,
                            match_titles=True)
    return container.children


class ApiReference(SphinxDirective):
  """`api-reference`: one autodoc section per public module."""

  def run(self):
    text = []
    for module in public_modules():
      text += [f"## `{module}`", "", "```{eval-rst}", f".. automodule:: {module}", "   :members:",
               "   :show-inheritance:"]
      if module == PACKAGE:
        text += ["   :imported-members:"]
      text += ["", "```", ""]
    container = nodes.section()
    container.document = self.state.document
    self.state.nested_parse(StringList(text, source="<api-reference>"), 0, container,
                            match_titles=True)
    return container.children


def _check(app, env):
  """Warns for every undocumented public name and every registered method without a page."""
  from lowrank_jax import registry
  documented = set(env.domaindata["py"]["objects"])
  for module_name in public_modules():
    module = importlib.import_module(module_name)
    for name in public_names(module_name):
      obj = getattr(module, name)
      if not callable(obj):  # constants are described by their module's docstring
        continue
      if not inspect.getdoc(obj):
        LOGGER.warning(f"undocumented public name: {module_name}.{name} has no docstring")
        continue
      target = f"{module_name}.{name}"
      if target not in documented:
        LOGGER.warning(f"undocumented public name: {module_name}.{name} ({target} is not in the "
                       "API reference)")
  for name in registry.list_methods():
    if name not in app.lowrank_method_pages:
      LOGGER.warning(f"registered method {name!r} has no page: add docs/methods/{name}.md with "
                     f"a `method-facts {name}` directive")


def _reset(app, env, docnames):
  del env, docnames
  app.lowrank_method_pages = {}


def setup(app):
  app.lowrank_method_pages = {}
  app.add_directive("method-facts", MethodFacts)
  app.add_directive("api-reference", ApiReference)
  app.connect("env-before-read-docs", _reset)
  app.connect("env-check-consistency", _check)
  return {"parallel_read_safe": False}
