"""Combinators, as in optax: `chain` applies adapters in order, `partition` routes subtrees.

>>> import jax, jax.numpy as jnp, lowrank_jax as lj
>>> p = {'q': {'kernel': jnp.ones((4, 4))}, 'v': {'kernel': jnp.ones((4, 4))}}
>>> ad = lj.partition({'lora': lj.lora(2), 'pissa': lj.pissa(1)},
...                   lambda path, leaf: 'lora' if path.startswith('q') else 'pissa')
>>> base, state = ad.init(jax.random.key(0), p)
>>> sorted(state.trainable)
['lora', 'pissa']
"""
from __future__ import annotations

import types
from typing import Any, Callable, Mapping, Union

import jax
import jax.numpy as jnp

from lowrank_jax import base as base_lib
from lowrank_jax import structured
from lowrank_jax import targeting
from lowrank_jax import tree as tree_lib


def chain(*adapters: base_lib.Adapter) -> base_lib.Adapter:
  """Applies `adapters` in order: `apply = a_n.apply(... a_1.apply(base, s_1) ..., s_n)`.

  `init` runs each adapter's init on the base left by the previous one, so a residual method
  followed by another on the same leaf sees the residual. State: `AdapterState(tuple of
  trainables, tuple of frozens)`. `hparams`: `{"adapters": ({"name", "hparams"} of each, in
  order)}`.
  """
  if not adapters:
    raise ValueError("chain: needs at least one adapter")

  def init(key, params, stats=None):
    keys = jax.random.split(key, len(adapters))
    base, trainable, frozen = params, [], []
    for k, ad in zip(keys, adapters):
      base, s = ad.init(k, base, stats)
      trainable.append(s.trainable)
      frozen.append(s.frozen)
    return base, base_lib.AdapterState(tuple(trainable), tuple(frozen))

  def apply(base, state, *, rng=None):
    _check_len("chain", state, len(adapters))
    p = base
    for i, ad in enumerate(adapters):
      r = None if rng is None else jax.random.fold_in(rng, i)
      p = ad.apply(p, base_lib.AdapterState(state.trainable[i], state.frozen[i]), rng=r)
    return p

  def penalty(state):
    return sum((ad.penalty(base_lib.AdapterState(t, f))
                for ad, t, f in zip(adapters, state.trainable, state.frozen)),
               jnp.zeros((), jnp.float32))

  update = None
  if any(ad.update is not None for ad in adapters):

    def update(state, grads, step):
      ts, fs = [], []
      for ad, t, f, g in zip(adapters, state.trainable, state.frozen, grads):
        s = base_lib.AdapterState(t, f)
        if ad.update is not None:
          s = ad.update(s, g, step)
        ts.append(s.trainable)
        fs.append(s.frozen)
      return base_lib.AdapterState(tuple(ts), tuple(fs))

  return base_lib.Adapter(init, apply, penalty, update,
                          name="chain(" + ",".join(a.name for a in adapters) + ")",
                          hparams=types.MappingProxyType(
                              {"adapters": tuple(_described(a) for a in adapters)}))


def _described(adapter: base_lib.Adapter) -> Mapping[str, Any]:
  """`{"name", "hparams"}` of a combined adapter, for the combinator's own hparams."""
  return types.MappingProxyType({"name": adapter.name, "hparams": adapter.hparams})


def _check_len(what, state, n):
  if not isinstance(state.trainable, tuple) or len(state.trainable) != n:
    raise ValueError(f"{what}: state does not come from this adapter (expected {n} sub-states)")


Labels = Union[Callable[[str, Any], Any], Any]


def _label_map(params, labels: Labels) -> dict[str, Any]:
  named = targeting.named_leaves(params)
  if callable(labels):
    return {n: labels(n, x) for n, x in named}
  lab_named = tree_lib.flatten_with_names(labels)[0]
  if [n for n, _ in lab_named] != [n for n, _ in named]:
    raise ValueError("partition: the label tree must have the structure of params "
                     f"(params paths e.g. {[n for n, _ in named][:3]}, label paths e.g. "
                     f"{[n for n, _ in lab_named][:3]})")
  return dict(lab_named)


def partition(adapters: Mapping[str, base_lib.Adapter], labels: Labels) -> base_lib.Adapter:
  """Sends differently labelled leaves to different adapters (optax `partition`).

  Args:
    adapters: `{label: adapter}`.
    labels: a callable `(path, leaf) -> label` or a pytree of labels shaped like params. A label
      of `None` leaves that leaf untouched. Each adapter sees only its own leaves (the others are
      hidden), so its `targets` are matched within its label.

  Returns:
    An `Adapter` whose `hparams` are
    ``{"adapters": {label: {"name", "hparams"}}, "labels": labels}``.

  Raises:
    ValueError: a label without adapter, or an adapter whose label is never used.
  """
  adapters = dict(adapters)
  names = sorted(adapters)

  def hidden_except(params, lab, name):
    """`params` with every leaf not labelled `name` hidden (so targets match within the label)."""
    def hide(path, x):
      return x if lab[tree_lib.path_to_str(path)] == name else targeting.Excluded(x)
    return jax.tree_util.tree_map_with_path(hide, params, is_leaf=structured.is_structured)

  def init(key, params, stats=None):
    lab = _label_map(params, labels)
    used = {l for l in lab.values() if l is not None}
    if used - set(names) or set(names) - used:
      raise ValueError(f"partition: labels without adapter: {sorted(map(str, used - set(names)))}; "
                       f"adapters without label: {sorted(set(names) - used)}")
    base = params
    trainable, frozen = {}, {}
    for name in names:
      sub_base, s = adapters[name].init(tree_lib.derive_key(key, name),
                                        hidden_except(params, lab, name), stats)
      repl = dict(targeting.named_leaves(sub_base))
      base = tree_lib.replace_by_name(base, repl, is_leaf=structured.is_structured)
      trainable[name], frozen[name] = s.trainable, s.frozen
    return base, base_lib.AdapterState(trainable, frozen)

  def apply(base, state, *, rng=None):
    if set(state.trainable) != set(names):
      raise ValueError(f"partition: state labels {sorted(state.trainable)} != adapters {names}")
    lab = _label_map(base, labels)
    p = base
    for name in names:
      r = None if rng is None else tree_lib.derive_key(rng, name)
      sub = adapters[name].apply(hidden_except(base, lab, name),
                                 base_lib.AdapterState(state.trainable[name], state.frozen[name]),
                                 rng=r)
      p = tree_lib.replace_by_name(p, dict(targeting.named_leaves(sub)),
                                   is_leaf=structured.is_structured)
    return p

  def penalty(state):
    return sum((adapters[n].penalty(base_lib.AdapterState(state.trainable[n], state.frozen[n]))
                for n in names), jnp.zeros((), jnp.float32))

  update = None
  if any(ad.update is not None for ad in adapters.values()):

    def update(state, grads, step):
      ts, fs = {}, {}
      for n in names:
        s = base_lib.AdapterState(state.trainable[n], state.frozen[n])
        if adapters[n].update is not None:
          s = adapters[n].update(s, grads[n], step)
        ts[n], fs[n] = s.trainable, s.frozen
      return base_lib.AdapterState(ts, fs)

  hparams = {"adapters": types.MappingProxyType({n: _described(adapters[n]) for n in names}),
             "labels": labels}
  return base_lib.Adapter(init, apply, penalty, update,
                          name="partition(" + ",".join(f"{n}={adapters[n].name}" for n in names) + ")",
                          hparams=types.MappingProxyType(hparams))
