"""Architecture knowledge stays in ``src/ukmp/models/``: no other module of the library names a module path inside a
model or a concrete adapter / part class. Everything else asks the adapter (ARCHITECTURE.md, "The adapter
contract")."""

from __future__ import annotations

import re
from pathlib import Path


SRC = Path(__file__).resolve().parents[2] / "src" / "ukmp"  # this checkout's library, whichever ukmp is imported
MODELS = SRC / "models"

PATH_PREFIXES = ("language_model.", "vision_model.")  # caught when a quote opens them: "language_model.encoder..."
TOKENS = (
    "SelfAttention", "EncDecAttention", "DenseReluDense", "wi_0", "wi_1",
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "Blip2T5Adapter", "Blip2Adapter", "CausalLMAdapter", "T5Part", "DecoderPart", "Blip2VisionPart",
)
PATTERN = re.compile(
    "|".join([r"""["'](?:%s)""" % "|".join(re.escape(p) for p in PATH_PREFIXES),
              r"\b(?:%s)\b" % "|".join(re.escape(t) for t in TOKENS),
              # OPT's output projection as a path component; the bare word is the baselines' option value
              # ``scope=out_proj`` (FLAP's name for "score at the output projection"), not a module path
              r"\.out_proj\b"])
)


def scan(files) -> list[str]:
    """``path:line: text`` for every line that names a module path or an architecture-specific name."""
    hits = []
    for f in map(Path, files):
        name = f.relative_to(SRC.parent.parent) if SRC in f.parents else f
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if PATTERN.search(line):
                hits.append(f"{name}:{i}: {line.strip()}")
    return hits


def _library_files_outside_models() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if MODELS not in p.parents)


def test_scanner_is_not_vacuous(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(
        "ok = 'language_model'\n"  # a bare name is fine: only dotted paths are module paths
        "a = model.get_submodule('language_model.encoder.block.0')\n"
        'b = f"vision_model.encoder.layers.{i}.self_attn"\n'
        "c = layer.mlp.gate_proj\n"
        "d = my_q_projection  # a longer identifier is not the token\n"
        "from ukmp.models.blip2 import Blip2T5Adapter\n"
        "scope = 'out_proj'  # an option value, not a path\n"
        "e = attn.out_proj.weight\n"
    )
    hits = scan([planted])
    assert [h.split(":")[1] for h in hits] == ["2", "3", "4", "6", "8"]  # and only those
    # the tokens do occur where they belong: the model adapters
    inside = scan(sorted(MODELS.rglob("*.py")))
    found = {m.group(0) for h in inside for m in PATTERN.finditer(h.split(": ", 1)[1])}
    assert {"q_proj", "o_proj", "gate_proj", "SelfAttention", "DenseReluDense", "wi_0",
            "DecoderPart", "T5Part", "Blip2VisionPart", "Blip2T5Adapter", "CausalLMAdapter"} <= found
    assert len(_library_files_outside_models()) > 20  # the scan below reads the whole library


def test_no_architecture_names_outside_models():
    hits = scan(_library_files_outside_models())
    assert not hits, "architecture knowledge outside src/ukmp/models/:\n" + "\n".join(hits)
