"""Baseline pruning methods (docs/BASELINES.md), registered in the method registry of :mod:`ukmp.prune.methods`
through the ``ukmp.methods`` entry point ``baselines`` (``pyproject.toml``): the prune layer never imports this
package.

=====================  ===========================================================================
``llm_pruner_global``  LLM-Pruner element-wise Taylor, shared P2 allocator, no modality normalisation
``llm_pruner_local``   the same scores, P1 (uniform per module)
``ecoflap_sp``         zeroth-order block scores, P4 water-filling, Wanda-sp ``group`` inside blocks
``flap``               fluctuation metric, AL-AM P3, bias compensation (returns a plan and ``pre_apply``)
``upop``               learnable gates with weight training, progressive P3 (returns a plan)
``magnitude_sp``       weight magnitude (``group`` or ``out_proj``), P1
``wanda_sp``           |W|·‖X‖ at the output projection, sequential by block, P1
=====================  ===========================================================================

Method knobs come from ``prune.options.<namespace>`` (llmp, ecoflap, flap, upop, mag, wanda); each module's
docstring lists them with defaults.
"""

from __future__ import annotations


def register_all() -> None:
    """Register every baseline (idempotent)."""
    from ukmp.baselines.ecoflap import score_ecoflap_sp
    from ukmp.baselines.flap import score_flap
    from ukmp.baselines.llm_pruner import score_llm_pruner_global, score_llm_pruner_local
    from ukmp.baselines.magnitude import score_magnitude_sp
    from ukmp.baselines.upop import score_upop
    from ukmp.baselines.wanda import score_wanda_sp
    from ukmp.prune.methods import METHODS, register_method

    table = [("llm_pruner_global", score_llm_pruner_global), ("llm_pruner_local", score_llm_pruner_local),
             ("ecoflap_sp", score_ecoflap_sp), ("flap", score_flap), ("upop", score_upop),
             ("magnitude_sp", score_magnitude_sp), ("wanda_sp", score_wanda_sp)]
    for name, fn in table:  # their traits (data-free, own plan, ratio-free) are declared in ukmp.method_traits
        if name not in METHODS:
            register_method(name, fn)


register_all()
