"""The UKMP ablation rows of the paper's Tables B and C, one table for every quality track.

``ROWS`` holds each table's variants as ``(label, overrides, rescore)``: the config overrides that make the variant
and whether it needs the UKMP scores recomputed (a normalisation variant re-allocates the reference run's scores).
UKMP's own row of each table is labelled ``UKMP_LABEL[table]``. A track picks its rows with :func:`ablation_table`;
the order of the rows it gets is the order here, which names its cached runs (``abl_<table>_<k>``).
"""

from __future__ import annotations

Row = tuple[str, list[str], bool]

UKMP_T = 0.4
UKMP_LABEL = {"B: M-normalise": "mean, iterative (UKMP)", "B: Taylor term": "first-order with threshold (UKMP)",
              "B: Entropy": "cosine (UKMP)", "C: threshold T": f"T = {UKMP_T} (UKMP)"}
# the second-order and mixed terms without a threshold back-propagate every token one sample at a time: the
# slowest rows, which the real-weights track leaves out
WITHOUT_THRESHOLD = ("second-order without threshold", "mixed without threshold")
ROWS: dict[str, list[Row]] = {
    "B: M-normalise": [
        ("no normalisation", ["prune.normalization=none"], False),
        (UKMP_LABEL["B: M-normalise"], ["prune.normalization=mean_iterative"], False),
        ("mean, not iterative", ["prune.normalization=mean_once"], False),
        ("min-max", ["prune.normalization=minmax"], False),
        ("standardise", ["prune.normalization=standardize"], False),
    ],
    "B: Taylor term": [
        (UKMP_LABEL["B: Taylor term"], [], True),
        ("first-order without threshold", ["prune.taylor=first_no_threshold"], True),
        ("second-order with threshold", ["prune.taylor=second", "prune.batch_size=1"], True),
        ("second-order without threshold", ["prune.taylor=second", "prune.threshold=1.0", "prune.batch_size=1"], True),
        ("mixed with threshold", ["prune.taylor=mix", "prune.batch_size=1"], True),
        ("mixed without threshold", ["prune.taylor=mix", "prune.threshold=1.0", "prune.batch_size=1"], True),
    ],
    "B: Entropy": [
        ("none", ["prune.entropy=none"], True),
        (UKMP_LABEL["B: Entropy"], [], True),
        ("arccos", ["prune.entropy=arccos"], True),
    ],
}


def threshold_rows(thresholds: tuple[float, ...]) -> list[Row]:
    """Table C: UKMP at each token-selection threshold T (every row re-scores)."""
    return [(f"T = {t}", [f"prune.threshold={t}"], True) for t in thresholds]


def ablation_table(thresholds: tuple[float, ...], tables: tuple[str, ...] = (*ROWS, "C: threshold T"),
                   reference: bool = True, skip: tuple[str, ...] = ()) -> dict[str, list[Row]]:
    """The rows of ``tables`` in order, Table C at ``thresholds``; ``reference=False`` leaves out UKMP's own row
    of Tables B (a track that reports its reference run there instead), ``skip`` leaves out rows by label."""
    out = {}
    for t in tables:
        rows = threshold_rows(thresholds) if t == "C: threshold T" else ROWS[t]
        out[t] = [r for r in rows if r[0] not in skip and (reference or r[0] != UKMP_LABEL[t])]
    return out
