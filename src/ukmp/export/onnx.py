"""``onnx``: the full-sequence logits graph of a pruned causal LM, for ONNX Runtime (the ``export`` extra: onnx and
onnxscript, which ``torch.onnx.export(..., dynamo=True)`` needs, and onnxruntime to run it).

The graph takes ``input_ids`` and ``attention_mask`` ([batch, sequence], both dynamic) and returns ``logits``
([batch, sequence, vocab]); no KV-cache inputs or outputs (every call reads the whole sequence). The pruned shapes
are exported as they are (no padding). The output is a directory: ``model.onnx``, the weights beside it in
``model.onnx.data``, and the tokenizer files of the pruned directory.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import torch
from torch import nn

from ukmp.export.source import EXTRA_HINT, Source, build_report, staged_output

EXAMPLE_SHAPE = (2, 8)  # batch and sequence of the tracing example (> 1: torch.export would specialise a 1)


def require_onnx() -> None:
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            raise ImportError(f"--format onnx needs the {name} package: {EXTRA_HINT}") from None


class LogitsGraph(nn.Module):
    """``model``'s logits for whole sequences (no cache), as the exported graph computes them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export_onnx(src: Source, out) -> dict[str, Any]:
    """Write ``src`` (in float32) as an ONNX directory at ``out`` (absent)."""
    require_onnx()
    model = src.model.eval()  # loaded in float32 by ukmp.export.export
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, EXAMPLE_SHAPE, generator=g)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with staged_output(out, is_dir=True) as tmp:
        quiet = logging.getLogger("torch.onnx")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            graph = LogitsGraph(model).eval()  # the wrapper too: torch.onnx warns of a module in training mode
            torch.onnx.export(graph, (ids, torch.ones_like(ids)), str(tmp / "model.onnx"), dynamo=True,
                              input_names=["input_ids", "attention_mask"], output_names=["logits"],
                              dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                              external_data=True, verbose=False)
        finally:
            quiet.setLevel(level)
        for f in src.processor_files():
            shutil.copy2(f, tmp / f.name)
    return build_report(src, "onnx", out, dtype="f32", padded=False,
                        notes=["full-sequence logits graph: no KV-cache inputs or outputs"])
