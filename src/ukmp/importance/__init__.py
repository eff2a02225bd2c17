"""Unit importance: Taylor scores with token selection, angle-histogram entropy (UKMI, UKMP_METHOD.md §2)."""

from ukmp.importance.entropy import (
    StreamingAngleHistogram,
    histogram_entropy,
    unit_entropies,
    unit_entropy,
)
from ukmp.importance.taylor import TaylorScorer, select_tokens, selected_loss, unit_reduce

__all__ = [
    "StreamingAngleHistogram", "TaylorScorer", "histogram_entropy", "select_tokens", "selected_loss",
    "unit_entropies", "unit_entropy", "unit_reduce",
]
