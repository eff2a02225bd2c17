"""What each pruning method is, beyond its scoring function: one declared fact per method, readable without torch.

Three properties decide how the rest of the library treats a method's scores:

- ``data_free``: it scores from the weights alone, so the prune stage reads no calibration data;
- ``plan``: who turns its scores into a plan. ``"shared"``: UKMP's allocator (:func:`ukmp.prune.allocate.allocate`),
  so cached scores can be re-allocated (``prune.scores_from``, ``ukmp plan --scores``) and iterative rounds can
  extend the plan. ``"own"``: the method returns its plan whatever its options (FLAP's AL-AM with bias
  compensation, ECoFLaP's block sparsities, UPop's search). ``"options"``: its own plan under some of its options
  only (Wanda-sp's sequential or carry-rounded P1; its floor-rounded variant returns allocation overrides instead);
- ``ratio_free``: its scores never read ``prune.ratio`` (the ratio enters only the allocation), so a comparison
  scores it once and re-allocates at every other ratio.

Config validation (:mod:`ukmp.config`) reads this table before torch is imported; the method registry
(:func:`ukmp.prune.methods.register_method`) takes a built-in method's traits from it and adds a plugin's own
declaration to it; the reuse layer, the prune stage and the benchmarks read it through :func:`method_traits`. A test
ties the table to the registered methods (entry-point ones included) both ways.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Plan = Literal["shared", "own", "options"]


@dataclass(frozen=True)
class MethodTraits:
    data_free: bool = False
    plan: Plan = "shared"
    ratio_free: bool = False


_OWN = MethodTraits(plan="own")

# name -> traits of every method ukmp ships (UKMP and the trivial methods of ukmp.prune.scoring, the baselines of
# ukmp.baselines); register_method adds a plugin's declaration here
TRAITS: dict[str, MethodTraits] = {
    "ukmp": MethodTraits(ratio_free=True),
    "random": MethodTraits(data_free=True),
    "magnitude": MethodTraits(data_free=True),
    "llm_pruner_global": MethodTraits(ratio_free=True),
    "llm_pruner_local": MethodTraits(),  # the same scores as llm_pruner_global (ukmp.compare.SCORE_SHARING)
    "ecoflap_sp": _OWN,
    "flap": _OWN,
    "upop": _OWN,
    "magnitude_sp": MethodTraits(data_free=True),
    "wanda_sp": MethodTraits(plan="options"),
}


def method_traits(name: str) -> MethodTraits:
    """The declared traits of ``name``; a name nobody declared (a method unknown here, e.g. one recorded in an old
    scores file) has the defaults: needs data, ranked by the shared allocator, ratio-dependent."""
    return TRAITS.get(name, MethodTraits())


def declare_traits(name: str, traits: MethodTraits) -> None:
    """Record a newly registered method's traits; a built-in's are fixed here and must not be contradicted."""
    known = TRAITS.get(name)
    if known is not None and known != traits:
        raise ValueError(f"prune.method: {name!r} declares {traits} but ukmp.method_traits has {known}")
    TRAITS[name] = traits
