"""Pruned models in the formats serving engines load: ``hf`` (stock transformers, zero-padded), ``gguf``
(llama.cpp) and ``onnx`` (ONNX Runtime).

Every export derives from a ukmp pruned-model directory (``plan.json`` + ``model.safetensors``, the canonical
artifact); bad input (no pruned model, a family the format cannot hold, an existing output) is refused in one line
before anything is written, and an output appears only when complete::

    from ukmp.export import export
    report = export("outputs/run/prune/model", "hf", "served/llama-pruned")
    report["saving_kept"]   # {"params": 0.41, "flops_per_token": 0.40}: what the padded shape keeps of the saving
"""

from __future__ import annotations

import os
from typing import Any

from ukmp.export.tables import FORMATS, formats_for  # noqa: F401  (re-exported)

HF_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def export(source: str | os.PathLike, fmt: str, out: str | os.PathLike, dtype: str | None = None,
           gguf_arch: str = "deci", pad_multiple: int = 0,
           mmproj: str | os.PathLike | None = None) -> dict[str, Any]:
    """Export the pruned model directory ``source`` as ``fmt`` to ``out`` (which must not exist); returns a report
    (parameters and per-token FLOPs of the dense, pruned and exported models, and the share of the saving kept).

    ``dtype``: hf ``f32|f16|bf16`` (default: as stored), gguf ``f32|f16|q8_0`` (default f32). ``gguf_arch``:
    ``deci`` (any plan) or ``llama`` (uniformly pruned models only). ``pad_multiple`` (gguf): zero-pad every MLP to
    a multiple of that many channels (32: every matrix quantisable to q8_0, llama.cpp's faster kernels).
    ``mmproj`` (gguf, LLaVA): also write the vision tower and projector as llama.cpp's mmproj file at that path
    (which must not exist either; :mod:`ukmp.export.mmproj`)."""
    from ukmp.export.source import check_output, check_source, load_source

    checked = check_source(source, fmt)  # read once: load_source takes it as it is
    if pad_multiple and fmt != "gguf":
        raise ValueError(f"--pad-multiple: gguf only (not {fmt})")
    if pad_multiple < 0:
        raise ValueError(f"--pad-multiple: {pad_multiple} must be >= 0")
    out = check_output(out)
    if mmproj is not None:
        if fmt != "gguf":
            raise ValueError(f"--mmproj: gguf only (not {fmt})")
        if checked[1] != "llava":
            raise ValueError(f"--mmproj: {checked[0]} is a {checked[1]} model; an mmproj file needs a LLaVA "
                             f"(vision tower + projector)")
        mmproj = check_output(mmproj)
        if mmproj.resolve() == out.resolve():
            raise ValueError(f"--mmproj: {mmproj} is the --out path too")
    if fmt == "hf":
        if dtype is not None and dtype not in HF_DTYPES:
            raise ValueError(f"--dtype: {dtype!r} is not one of {', '.join(HF_DTYPES)} for hf")
        from ukmp.export.hf import export_hf

        return export_hf(load_source(source, fmt, HF_DTYPES.get(dtype or ""), checked), out)
    if fmt == "gguf":
        from ukmp.export.gguf import check_dtype, export_gguf, require_gguf

        require_gguf()
        dtype = dtype or "f32"
        check_dtype(None, dtype)
        return export_gguf(load_source(source, fmt, checked=checked), out, dtype=dtype, arch=gguf_arch,
                           pad_multiple=pad_multiple, mmproj=mmproj)
    from ukmp.export.onnx import export_onnx, require_onnx

    if dtype not in (None, "f32"):  # the arguments first: a wrong one is named whatever is installed
        raise ValueError(f"--dtype: {dtype!r}; onnx is written in f32 only")
    require_onnx()
    return export_onnx(load_source(source, fmt, "float32", checked), out)


def format_report(report: dict[str, Any]) -> str:
    """The report in a few lines for the command line."""
    lines = [f"wrote {report['out']} ({report['format']}" + (f", {report['arch']}, {report['dtype']}"
                                                              if report.get("arch") else "") + ")"]
    if report.get("widths"):
        lines.append("widths: " + ", ".join(f"{k} {v}" for k, v in report["widths"].items())
                     + (" (zero-padded to the widest kept layer)" if report.get("padded") else " (no padding)"))
    for key, label in (("params", "parameters"), ("flops_per_token", "Linear FLOPs per token")):
        c = report.get(key)
        if c:
            lines.append(f"{label}: dense {c['dense']:,}, pruned {c['pruned']:,}, exported {c['exported']:,} "
                         f"(keeps {100 * report['saving_kept'][key]:.1f} % of the saving)")
    lines += [f"note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)
