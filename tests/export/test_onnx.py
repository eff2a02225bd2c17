"""``ukmp export --format onnx``: ONNX Runtime gives PyTorch's logits within 1e-4 on a non-uniformly pruned tiny
Llama, at shapes other than the traced one (batch and sequence are dynamic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ukmp.cli import main
from ukmp.export import export
from ukmp.io import load_pruned

TOL = 1e-4  # float32, ONNX Runtime's kernels vs PyTorch's (measured 3e-7 on the tiny models)
HINT = "needs the export extra: pip install 'ukmp[export]'"


@pytest.mark.slow  # the dynamo export takes 13-18 s on 2 busy cores (2026-12-07), about a third of that idle
def test_onnxruntime_matches_pytorch(pruned_lms, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason=HINT)
    pytest.importorskip("onnxscript", reason=HINT)
    _, _, path, dense = pruned_lms["qwen2"]  # q/k/v biases, non-uniform layers
    report = export(path, "onnx", tmp_path / "onnx")
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [
        "model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"]
    assert report["saving_kept"] == {"params": 1.0, "flops_per_token": 1.0}
    model = load_pruned(path, dtype="float32")
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(3)
    for shape in ((1, 5), (3, 11)):
        ids = torch.randint(3, model.config.vocab_size, shape, generator=g)
        mask = torch.ones_like(ids)
        mask[-1, -2:] = 0  # a right-padded row
        (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).logits.numpy()
            other = dense.float()(input_ids=ids, attention_mask=mask).logits.numpy()
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= TOL
        assert np.abs(other - ref).max() > 1e-2  # the tolerance tells the pruned model from the dense one


def test_onnx_refusals(pruned_lms, tmp_path, capsys, monkeypatch):
    src = str(pruned_lms["llama"][2])
    rc = main(["export", src, "--format", "onnx", "--out", str(tmp_path / "o"), "--dtype", "f16"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "f32 only" in err and len(err.splitlines()) == 1
    monkeypatch.setitem(__import__("sys").modules, "onnxscript", None)  # as if not installed (onnx may be too)
    rc = main(["export", src, "--format", "onnx", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and ("onnxscript" in err or "onnx package" in err) and "ukmp[export]" in err
    assert not any(tmp_path.iterdir())
