"""Paper reproductions at small, CPU-feasible scale: one config per claim, run by its
`experiments/repro_*.py` script; each docstring states the command, the claim and our result."""
