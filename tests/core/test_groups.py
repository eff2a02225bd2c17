import torch

from ukmp.models import adapter_for
from ukmp.models.build import load_model


def test_groups_cover_every_prunable_linear_of_the_tiny_model(tiny):
    model, _ = tiny
    adapter = adapter_for(model)
    groups = adapter.groups()
    kinds = [g.kind for g in groups]
    cfg = model.config
    assert kinds.count("vit_heads") == kinds.count("vit_mlp") == cfg.vision_config.num_hidden_layers
    assert kinds.count("enc_heads") == kinds.count("enc_ffn") == cfg.text_config.num_layers
    for k in ("dec_self_heads", "dec_cross_heads", "dec_ffn"):
        assert kinds.count(k) == cfg.text_config.num_decoder_layers
    # params_per_unit equals the weights its slices own, computed from the real tensors
    for g in groups:
        owned = 0
        for s in g.slices:
            t = getattr(model.get_submodule(s.module), s.param)
            owned += s.unit_size * (t.numel() // t.shape[s.dim]) if t.dim() == 2 else s.unit_size
        assert owned == g.params_per_unit, g.id
    # nothing from the Q-Former, projection, embeddings or lm_head is ever touched
    touched = {s.module for g in groups for s in g.slices}
    assert not any(m.startswith(("qformer", "language_projection")) or "lm_head" in m for m in touched)


def test_full_size_structure_on_meta():
    model = load_model("blip2-flan-t5-xl", random_weights_device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    groups = adapter_for(model).groups()
    by_kind = {}
    for g in groups:
        by_kind.setdefault(g.kind, []).append(g.n_units)
    assert by_kind["vit_heads"] == [16] * 39 and by_kind["vit_mlp"] == [6144] * 39
    assert by_kind["enc_heads"] == [32] * 24 and by_kind["enc_ffn"] == [5120] * 24
    assert by_kind["dec_self_heads"] == [32] * 24 and by_kind["dec_cross_heads"] == [32] * 24
    assert by_kind["dec_ffn"] == [5120] * 24
    lm = model.language_model
    assert lm.lm_head.weight is not lm.shared.weight  # FlanT5 keeps a separate lm_head
    assert type(lm.encoder.block[0].layer[1].DenseReluDense.act).__name__ == "GELUActivation"
    assert torch.Size([32, 32]) == lm.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.shape
