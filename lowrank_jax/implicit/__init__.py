"""Implicit differentiation of solver outputs (`jax.custom_vjp` around roots and fixed points).

Public API:
  * `custom_root(optimality_fn, solve=..., config=...)`, `custom_fixed_point(T, ...)` and the
    plain forward solver `fixed_point_iteration`: decorators in the style of Blondel et al. 2022
    (no jaxopt dependency). The solver runs under `stop_gradient`; the backward solves the
    transposed linear system matrix-free.
  * `linear_solve` with methods ``cg``, ``gmres``, ``normal_cg``, ``neumann``, ``dense``;
    `AdjointConfig` (frozen, hashable static settings), `SolveInfo`, and the
    `AdjointDiagnostics` probe that reads residual / iterations / convergence out of a backward.
  * `kept_subspace_projector`, `corda_delta`, `damped_covariance`, `ProjectorInfo`:
    the differentiable CorDA initialisation with the gap-only Sylvester/CG backward.
  * `lowrank_jax.implicit.testing.check_implicit_grad` for gradient checks.
  * `lowrank_jax.implicit.relax`: SOR on explicit matrices and the bandits that choose its
    relaxation across a sequence of systems (Tsallis-INF; SquareCB on Chebyshev features of a
    context such as a diagonal shift).

All rules are `custom_vjp`: reverse mode composes with `jit` and `vmap`; forward mode (`jvp`,
`jacfwd`) is blocked by JAX for `custom_vjp` functions.
"""
from lowrank_jax.implicit._config import AdjointConfig
from lowrank_jax.implicit._config import AdjointDiagnostics
from lowrank_jax.implicit._config import SolveInfo
from lowrank_jax.implicit._linear_solve import linear_solve
from lowrank_jax.implicit._projector import ProjectorInfo
from lowrank_jax.implicit._projector import corda_delta
from lowrank_jax.implicit._projector import damped_covariance
from lowrank_jax.implicit._projector import kept_subspace_projector
from lowrank_jax.implicit._root import custom_fixed_point
from lowrank_jax.implicit._root import custom_root
from lowrank_jax.implicit._root import fixed_point_iteration
from lowrank_jax.implicit import relax

__all__ = [
    "AdjointConfig",
    "AdjointDiagnostics",
    "ProjectorInfo",
    "SolveInfo",
    "corda_delta",
    "custom_fixed_point",
    "custom_root",
    "damped_covariance",
    "fixed_point_iteration",
    "kept_subspace_projector",
    "linear_solve",
    "relax",
]
