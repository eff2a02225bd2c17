"""``ukmp export --format gguf``, read back with ``gguf.GGUFReader`` (no llama.cpp needed): per-layer arrays equal
the plan, every tensor has the pruned model's shape, undoing the rotary permutation gives the weights bit for bit,
the tokenizer travels, and what GGUF cannot hold is refused in one line with nothing written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ukmp.cli import main
from ukmp.export import export
from ukmp.export.gguf import lm_name, permute_rotary, unpermute_rotary
from ukmp.io import read_plan
from ukmp.models import adapter_for

gguf = pytest.importorskip("gguf", reason="needs the gguf package of the export extra: pip install 'ukmp[export]'")

CASES = ("llama", "qwen2", "llama_uniform", "llava")  # LLaVA: its language model


def _text_config(model):
    return getattr(model.config, "text_config", model.config)


def _fields(reader, arch: str) -> dict:
    return {k.removeprefix(arch + "."): f.contents() for k, f in reader.fields.items()}


@pytest.fixture(scope="module")
def files(pruned_lms, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {case: (export(pruned_lms[case][2], "gguf", root / f"{case}.gguf"), gguf.GGUFReader(root / f"{case}.gguf"))
            for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_per_layer_arrays_equal_the_plan(pruned_lms, files, case):
    model, _, path, _ = pruned_lms[case]
    plan, f = read_plan(path), _fields(files[case][1], "deci")
    cfg = _text_config(model)
    r = cfg.num_attention_heads // cfg.num_key_value_heads
    n = cfg.num_hidden_layers
    kv = [len(plan.keep[f"lm.layers.{i}.attn"]) for i in range(n)]
    assert f["feed_forward_length"] == [len(plan.keep[f"lm.layers.{i}.mlp"]) for i in range(n)]
    assert f["attention.head_count_kv"] == kv
    assert f["attention.head_count"] == [k * r for k in kv]
    assert f["attention.key_length"] == f["attention.value_length"] == f["rope.dimension_count"] == 16
    assert f["block_count"] == n and f["embedding_length"] == cfg.hidden_size
    if case != "llama_uniform":  # the plans are really non-uniform: plain llama could not hold them
        assert len(set(f["feed_forward_length"])) > 1


@pytest.mark.parametrize("case", CASES)
def test_tensor_shapes_match_and_rotary_permutation_undoes_bit_for_bit(pruned_lms, files, case):
    model = pruned_lms[case][0]
    reader = files[case][1]
    n = _text_config(model).num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, n)
    part = adapter_for(model).lm
    sd = {names.get_name(lm_name(part, k), try_suffixes=(".weight", ".bias")): v.float()
          for k, v in model.state_dict().items() if lm_name(part, k) and not k.endswith("inv_freq")}
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(sd)
    heads = _fields(reader, "deci")
    permuted = 0
    for name, t in tensors.items():
        got = torch.from_numpy(np.array(t.data))
        assert tuple(got.shape) == tuple(sd[name].shape), name
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        i = int(name.split(".")[1]) if name.startswith("blk.") else None
        n_head = (heads["attention.head_count"][i] if ".attn_q." in name
                  else heads["attention.head_count_kv"][i] if ".attn_k." in name else None)
        if n_head is None:
            assert torch.equal(got, sd[name]), name
            continue
        assert torch.equal(unpermute_rotary(got, n_head), sd[name]), name  # bit for bit
        assert not torch.equal(got, sd[name])  # the permutation did move rows
        permuted += 1
    assert permuted == n * (4 if case == "qwen2" else 2)  # q and k weights (and Qwen2's q/k biases) of each layer


def test_permutation_is_llama_cpps_interleaving():
    """Within each head, HF's halves [x0..x3 | y0..y3] become llama.cpp's pairs (x0 y0 x1 y1 ...); inverse exact."""
    w = torch.arange(16.0).reshape(16, 1)  # 2 heads of 8 rows
    p = permute_rotary(w, 2).flatten().tolist()
    assert p[:8] == [0, 4, 1, 5, 2, 6, 3, 7] and p[8:] == [8, 12, 9, 13, 10, 14, 11, 15]
    assert torch.equal(unpermute_rotary(permute_rotary(w, 2), 2), w)
    assert not torch.equal(unpermute_rotary(permute_rotary(w, 2), 1), w)  # the head count matters


def test_tokenizer_travels_padded_to_the_vocabulary(pruned_lms, files):
    tok = pruned_lms["llama"][1]
    f = _fields(files["llama"][1], "deci")
    tokens = f["tokenizer.ggml.tokens"]
    assert f["tokenizer.ggml.model"] == "t5" and len(tokens) == pruned_lms["llama"][0].config.vocab_size
    assert tokens[:len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id and f["tokenizer.ggml.unknown_token_id"] == 2


def test_byte_level_bpe_tokenizer_travels_with_its_merges(bpe_pruned, tmp_path):
    import json

    _, tok, path = bpe_pruned
    export(path, "gguf", tmp_path / "b.gguf")
    f = _fields(gguf.GGUFReader(tmp_path / "b.gguf"), "deci")
    assert f["tokenizer.ggml.model"] == "gpt2" and len(f["tokenizer.ggml.tokens"]) == 320
    assert f["tokenizer.ggml.pre"] == "gpt-2"  # a lone ByteLevel pre-tokenizer: GPT-2's split, named for llama.cpp
    assert f["tokenizer.ggml.tokens"][:300] == tok.convert_ids_to_tokens(list(range(300)))
    merges = json.loads((path / "tokenizer.json").read_text())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in merges] and len(merges) > 10
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert f["tokenizer.ggml.eos_token_id"] == eos
    assert f["tokenizer.ggml.token_type"][eos] == gguf.TokenType.CONTROL
    assert f["tokenizer.ggml.token_type"][305] == gguf.TokenType.UNUSED


def test_uniform_plan_as_plain_llama_and_q8_0(pruned_lms, tmp_path):
    path = pruned_lms["llama_uniform"][2]
    export(path, "gguf", tmp_path / "u.gguf", gguf_arch="llama")
    f = _fields(gguf.GGUFReader(tmp_path / "u.gguf"), "llama")
    assert f["general.architecture"] == "llama" and f["feed_forward_length"] == 64 and f["attention.head_count"] == 2
    # widths 64 / 32 are multiples of 32: q8_0 holds them. Each block of 32 is within half a step (max|x| / 127) plus
    # the rounding of its scale to f16 (127 * 2^-11 steps): 0.6 steps
    export(path, "gguf", tmp_path / "q.gguf", dtype="q8_0")
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    ref = pruned_lms["llama_uniform"][0].model.layers[0].mlp.down_proj.weight.detach().float().numpy()
    deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
    step = np.abs(ref.reshape(-1, 32)).max(axis=1) / 127
    err = np.abs(deq - ref).reshape(-1, 32).max(axis=1)
    assert (err <= 0.6 * step).all() and (err > 0.3 * step).all()  # really quantised, to 8 bits


def test_f16_keeps_norms_and_biases_f32(pruned_lms, tmp_path):
    export(pruned_lms["qwen2"][2], "gguf", tmp_path / "h.gguf", dtype="f16")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "h.gguf").tensors}
    F16, F32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    assert types["blk.1.ffn_down.weight"] == F16 and types["token_embd.weight"] == F16
    assert types["blk.1.attn_q.bias"] == F32 and types["blk.1.attn_norm.weight"] == F32


def _refused(argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err


def test_gguf_refusals_write_nothing(pruned_lms, tmp_path, capsys):
    src = str(pruned_lms["llama"][2])
    out = str(tmp_path / "x.gguf")
    err = _refused(["export", src, "--format", "gguf", "--out", out, "--gguf-arch", "llama"], capsys)
    assert "write it as deci" in err
    err = _refused(["export", src, "--format", "gguf", "--out", out, "--dtype", "q8_0"], capsys)
    assert "multiples of 32" in err and "mlp.down_proj" in err
    err = _refused(["export", src, "--format", "gguf", "--out", out, "--dtype", "bf16"], capsys)
    assert "--dtype" in err
    (tmp_path / "taken.gguf").write_bytes(b"mine")
    assert "already exists" in _refused(["export", src, "--format", "gguf", "--out",
                                         str(tmp_path / "taken.gguf")], capsys)
    assert (tmp_path / "taken.gguf").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]  # no temp file left either


def test_missing_gguf_package_names_the_extra(pruned_lms, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # as if not installed
    err = _refused(["export", str(pruned_lms["llama"][2]), "--format", "gguf", "--out", str(tmp_path / "m.gguf")],
                   capsys)
    assert "ukmp[export]" in err and not any(tmp_path.iterdir())


def test_pad_multiple_rounds_every_mlp_up_with_zeros(pruned_lms, tmp_path):
    """``--pad-multiple 32``: every ``feed_forward_length`` a multiple of 32, the kept channels first and bit for bit,
    zeros after; q8_0, refused for the unpadded widths, then quantises every matrix."""
    model, _, path, _ = pruned_lms["llama"]
    plan = read_plan(path)
    kept = [len(plan.keep[f"lm.layers.{i}.mlp"]) for i in range(model.config.num_hidden_layers)]
    assert any(k % 32 for k in kept)  # not vacuous: the plan's widths are unaligned
    with pytest.raises(ValueError, match="multiples of 32"):
        export(path, "gguf", tmp_path / "q.gguf", dtype="q8_0")
    report = export(path, "gguf", tmp_path / "p.gguf", pad_multiple=32)
    reader = gguf.GGUFReader(tmp_path / "p.gguf")
    ffn = _fields(reader, "deci")["feed_forward_length"]
    assert ffn == [-(-k // 32) * 32 for k in kept] and report["params"]["exported"] > report["params"]["pruned"]
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    for i, k in enumerate(kept):
        down = tensors[f"blk.{i}.ffn_down.weight"]  # [hidden, ffn]
        assert torch.equal(down[:, :k], model.model.layers[i].mlp.down_proj.weight.float())
        assert not down[:, k:].any() and not tensors[f"blk.{i}.ffn_up.weight"][k:].any()
    export(path, "gguf", tmp_path / "pq.gguf", dtype="q8_0", pad_multiple=32)
    types = {t.tensor_type for t in gguf.GGUFReader(tmp_path / "pq.gguf").tensors if len(t.shape) > 1}
    assert types == {gguf.GGMLQuantizationType.Q8_0}
    with pytest.raises(ValueError, match="gguf only"):
        export(path, "onnx", tmp_path / "o", pad_multiple=32)
