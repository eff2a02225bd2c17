"""``ukmp export --format gguf --mmproj PATH``: a pruned LLaVA's vision tower + projector as llama.cpp's mmproj file,
read back with ``gguf.GGUFReader`` (no llama.cpp needed): the keys llama.cpp's CLIP loader reads, only the vision
layers the language model reads, every tensor's shape, the zero-padded weights equal to the pruned ones in the kept
slots and zero elsewhere, the projector bit for bit, and a PyTorch forward pass over the file's own tensors equal to
the pruned model's image features (the padding keeps the function). Bad input is refused in one line with nothing
written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ukmp.cli import main
from ukmp.export import export
from ukmp.io import read_plan

gguf = pytest.importorskip("gguf", reason="needs the gguf package of the export extra: pip install 'ukmp[export]'")

CASES = ("llava", "llava_deep", "llava_64")  # 1, 2 and 2 CLIP layers read (of 2, 3 and 3)


@pytest.fixture(scope="module")
def files(make_pruned, tmp_path_factory):
    """{case: (pruned float32 model, its directory, report, reader of the mmproj file)}."""
    root = tmp_path_factory.mktemp("mmproj")
    out = {}
    for case in CASES:
        model, _, path, _ = make_pruned(root, case, torch.float32)
        report = export(path, "gguf", root / f"{case}.gguf", mmproj=root / f"{case}.mmproj.gguf")
        out[case] = (model, path, report, gguf.GGUFReader(root / f"{case}.mmproj.gguf"))
    return out


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def _tensors(reader) -> dict[str, np.ndarray]:
    """name -> array in PyTorch's (row-major) shape."""
    return {t.name: np.array(t.data).reshape(tuple(reversed([int(d) for d in t.shape]))) for t in reader.tensors}


@pytest.mark.parametrize("case", CASES)
def test_keys_are_those_llama_cpp_clip_loader_reads(files, case):
    model, path, report, reader = files[case]
    f, vc = _fields(reader), model.config.vision_config
    n = model.config.vision_feature_layer  # absolute once the unused layers are dropped
    assert f["general.architecture"] == "clip" and f["clip.projector_type"] == "mlp"
    assert f["clip.has_vision_encoder"] is True and f["clip.use_gelu"] is False  # CLIP's quick GELU
    assert f["clip.vision.block_count"] == n == vc.num_hidden_layers == report["mmproj"]["layers"]
    assert f["clip.vision.feature_layer"] == [n]
    assert read_plan(path).drop_layers["vision"]["keep"] == n  # the layer after hidden state -2 stays dropped
    assert f["clip.vision.embedding_length"] == vc.hidden_size
    assert f["clip.vision.attention.head_count"] == 4  # the dense count: head size = 64 / 4 as in the model
    mm = report["mmproj"]
    assert f["clip.vision.feed_forward_length"] == max(mm["ffn_written"])
    assert mm["ffn_written"] == [c + (c == vc.hidden_size) for c in mm["ffn"]]  # one zero channel at 64 only
    assert f["clip.vision.image_size"] == vc.image_size and f["clip.vision.patch_size"] == vc.patch_size
    assert f["clip.vision.projection_dim"] == model.config.text_config.hidden_size
    np.testing.assert_allclose(f["clip.vision.image_mean"], [0.48145466, 0.4578275, 0.40821073], rtol=1e-6)
    np.testing.assert_allclose(f["clip.vision.image_std"], [0.26862954, 0.26130258, 0.27577711], rtol=1e-6)
    assert abs(f["clip.vision.attention.layer_norm_epsilon"] - vc.layer_norm_eps) < 1e-12


@pytest.mark.parametrize("case", CASES)
def test_padded_weights_equal_the_pruned_ones_and_zero_elsewhere(files, case):
    model, _, report, reader = files[case]
    T, sd = _tensors(reader), {k: v.numpy() for k, v in model.state_dict().items()}
    mm = report["mmproj"]
    n, E = mm["layers"], model.config.vision_config.hidden_size
    assert not any(k.startswith(("v.post_ln", f"v.blk.{n}.")) for k in T)  # nothing LLaVA does not read
    v = "model.vision_tower"
    for i in range(n):
        L, b = f"{v}.encoder.layers.{i}", f"v.blk.{i}"
        kept, ch, ffn = mm["heads"][i] * 16, mm["ffn"][i], mm["ffn_written"][i]
        for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")):
            w, bias = T[f"{b}.{ours}.weight"], T[f"{b}.{ours}.bias"]
            assert w.shape == (E, E) and bias.shape == (E,)
            assert np.array_equal(w[:kept], sd[f"{L}.self_attn.{theirs}.weight"]) and not w[kept:].any()
            assert np.array_equal(bias[:kept], sd[f"{L}.self_attn.{theirs}.bias"]) and not bias[kept:].any()
        o = T[f"{b}.attn_out.weight"]
        assert np.array_equal(o[:, :kept], sd[f"{L}.self_attn.out_proj.weight"]) and not o[:, kept:].any()
        up, up_b, down = T[f"{b}.ffn_up.weight"], T[f"{b}.ffn_up.bias"], T[f"{b}.ffn_down.weight"]
        assert up.shape == (ffn, E) and down.shape == (E, ffn)
        assert np.array_equal(up[:ch], sd[f"{L}.mlp.fc1.weight"]) and not up[ch:].any()
        assert np.array_equal(up_b[:ch], sd[f"{L}.mlp.fc1.bias"]) and not up_b[ch:].any()
        assert np.array_equal(down[:, :ch], sd[f"{L}.mlp.fc2.weight"]) and not down[:, ch:].any()
        assert np.array_equal(T[f"{b}.ln2.bias"], sd[f"{L}.layer_norm2.bias"])
    if case == "llava_64":  # 64 = hidden_size channels kept: written with one zero channel more
        assert mm["ffn"][0] == 64 and mm["ffn_written"][0] == 65
    if case == "llava_deep":  # really non-uniform: heads and MLP widths differ between the layers read
        assert min(mm["heads"]) < 4 and len(set(mm["ffn"])) > 1
    # the projector and the embeddings bit for bit
    for ours, theirs in (("mm.0.weight", "model.multi_modal_projector.linear_1.weight"),
                         ("mm.0.bias", "model.multi_modal_projector.linear_1.bias"),
                         ("mm.2.weight", "model.multi_modal_projector.linear_2.weight"),
                         ("mm.2.bias", "model.multi_modal_projector.linear_2.bias"),
                         ("v.patch_embd.weight", f"{v}.embeddings.patch_embedding.weight"),
                         ("v.position_embd.weight", f"{v}.embeddings.position_embedding.weight"),
                         ("v.class_embd", f"{v}.embeddings.class_embedding"),
                         ("v.pre_ln.weight", f"{v}.pre_layrnorm.weight")):
        assert T[ours].dtype == np.float32 and np.array_equal(T[ours], sd[theirs]), ours


def _file_forward(T: dict[str, np.ndarray], f: dict, pixels: torch.Tensor) -> torch.Tensor:
    """LLaVA's image features computed from the mmproj file's tensors alone (HF CLIP's token order: class token
    first), with the file's uniform head count."""
    t = {k: torch.from_numpy(a.copy()) for k, a in T.items()}
    E, H, eps = f["clip.vision.embedding_length"], f["clip.vision.attention.head_count"], 1e-5
    x = F.conv2d(pixels, t["v.patch_embd.weight"], stride=f["clip.vision.patch_size"]).flatten(2).transpose(1, 2)
    x = torch.cat([t["v.class_embd"][None, None], x], 1) + t["v.position_embd.weight"]
    x = F.layer_norm(x, (E,), t["v.pre_ln.weight"], t["v.pre_ln.bias"], eps)
    n = x.shape[1]
    for i in range(f["clip.vision.block_count"]):
        b = lambda name: (t[f"v.blk.{i}.{name}.weight"], t[f"v.blk.{i}.{name}.bias"])  # noqa: E731
        h = F.layer_norm(x, (E,), *b("ln1"), eps)
        q, k, v = (F.linear(h, *b(p)).view(1, n, H, E // H).transpose(1, 2) for p in ("attn_q", "attn_k", "attn_v"))
        a = torch.softmax(q @ k.transpose(-1, -2) / (E // H) ** 0.5, -1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(1, n, E), *b("attn_out"))
        h = F.linear(F.layer_norm(x, (E,), *b("ln2"), eps), *b("ffn_up"))
        x = x + F.linear(h * torch.sigmoid(1.702 * h), *b("ffn_down"))
    x = F.gelu(F.linear(x[:, 1:], t["mm.0.weight"], t["mm.0.bias"]))
    return F.linear(x, t["mm.2.weight"], t["mm.2.bias"])[0]


@pytest.mark.parametrize("case", CASES)
def test_the_padded_file_computes_the_pruned_models_image_features(files, make_pruned, image_features, tmp_path,
                                                                    case):
    model, _, _, reader = files[case]
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = _file_forward(_tensors(reader), _fields(reader), pixels)
    ref = image_features(model, pixels)
    assert (got - ref).abs().max() <= 1e-5  # float32 both; measured ~1e-7 (the zero heads / channels add nothing)
    dense = make_pruned(tmp_path, case, torch.float32)[3]
    assert (image_features(dense, pixels) - ref).abs().max() > 1e-3  # the tolerance tells pruned from dense


def test_mmproj_needs_a_llava_and_new_paths(pruned_lms, files, tmp_path, capsys):
    llama = pruned_lms["llama"][2]
    with pytest.raises(ValueError, match="--mmproj: .* is a llama model; an mmproj file needs a LLaVA"):
        export(llama, "gguf", tmp_path / "a.gguf", mmproj=tmp_path / "a.mmproj.gguf")
    _, llava, _, _ = files["llava"]
    with pytest.raises(ValueError, match="--mmproj: gguf only"):
        export(llava, "hf", tmp_path / "hf", mmproj=tmp_path / "b.mmproj.gguf")
    (tmp_path / "taken.gguf").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="taken.gguf: already exists"):
        export(llava, "gguf", tmp_path / "c.gguf", mmproj=tmp_path / "taken.gguf")
    with pytest.raises(ValueError, match="is the --out path too"):
        export(llava, "gguf", tmp_path / "d.gguf", mmproj=tmp_path / "d.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]  # nothing else written, nothing touched
    assert (tmp_path / "taken.gguf").read_bytes() == b"mine"
    # one line from the command line, exit 2
    assert main(["export", str(llama), "--format", "gguf", "--out", str(tmp_path / "e.gguf"),
                 "--mmproj", str(tmp_path / "e.mmproj.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs a LLaVA" in err
    assert main(["export", str(llava), "--format", "gguf", "--out", str(tmp_path / "f.gguf"),
                 "--mmproj", str(tmp_path / "f.mmproj.gguf")]) == 0
    assert "mmproj" in capsys.readouterr().out and (tmp_path / "f.mmproj.gguf").is_file()


def test_a_failed_mmproj_leaves_neither_file(files, tmp_path, monkeypatch):
    _, llava, _, _ = files["llava"]

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("ukmp.export.mmproj.write_mmproj", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export(llava, "gguf", tmp_path / "g.gguf", mmproj=tmp_path / "g.mmproj.gguf")
    assert list(tmp_path.iterdir()) == []


def test_the_report_counts_the_vision_saving_the_file_keeps(files):
    for case in CASES:
        mm = files[case][2]["mmproj"]
        p = mm["params"]
        assert p["pruned"] < p["exported"] < p["dense"]  # the heads come back, the dropped layer does not
        assert mm["saving_kept"] == pytest.approx((p["dense"] - p["exported"]) / (p["dense"] - p["pruned"]))
