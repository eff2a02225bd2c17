"""The BLIP-2 / InstructBLIP ViT (``Blip2VisionModel``, ``InstructBlipVisionModel``): fused ``qkv`` with separate
q/v biases, ``projection``, ``fc1``/``fc2``.

Groups ``vision.layers.{i}.attn`` (heads: q, k, v thirds of the fused ``qkv`` rows + ``projection`` columns) and
``vision.layers.{i}.mlp`` (channels: ``fc1`` row and bias + ``fc2`` column).
"""

from __future__ import annotations

from torch import nn

from ukmp.groups import ParamSlice, PrunableGroup
from ukmp.models.base import FeatureBlock, LayeredPart


class Blip2VisionPart(LayeredPart):
    modality = "vision"

    def __init__(self, config, prefix: str = "vision_model", gid: str = "vision"):
        super().__init__(config, prefix)
        self.gid = gid
        self.layers_path = f"{prefix}.encoder.layers"
        self.n_layers = config.num_hidden_layers
        self.width = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.inter = config.intermediate_size
        self.qkv_bias = bool(config.qkv_bias)

    def layer_groups(self, i: int) -> list[PrunableGroup]:
        p = f"{self.layers_path}.{i}"
        E, hd = self.width, self.head_dim
        head_slices = [ParamSlice(f"{p}.self_attn.qkv", "weight", 0, hd, off) for off in (0, E, 2 * E)]
        if self.qkv_bias:
            head_slices += [ParamSlice(f"{p}.self_attn.qkv", "bias", 0, hd, off) for off in (0, E, 2 * E)]
        head_slices.append(ParamSlice(f"{p}.self_attn.projection", "weight", 1, hd))
        mlp_slices = (
            ParamSlice(f"{p}.mlp.fc1", "weight", 0, 1),
            ParamSlice(f"{p}.mlp.fc1", "bias", 0, 1),
            ParamSlice(f"{p}.mlp.fc2", "weight", 1, 1),
        )
        return [
            PrunableGroup(f"{self.gid}.layers.{i}.attn", "vit_heads", "heads", "vision", i, self.n_heads,
                          4 * E * hd + (3 * hd if self.qkv_bias else 0), tuple(head_slices)),
            PrunableGroup(f"{self.gid}.layers.{i}.mlp", "vit_mlp", "channels", "vision", i, self.inter,
                          2 * E + 1, mlp_slices),
        ]

    def update_attention_(self, model: nn.Module, group: PrunableGroup, kept: list[int]) -> None:
        from ukmp.models.attention import HEAD_PRUNED_VIT_ATTENTION

        path = group.slices[-1].module.rsplit(".", 1)[0]
        attn = model.get_submodule(path)
        stock = next((c for c in type(attn).__mro__ if c in HEAD_PRUNED_VIT_ATTENTION), None)
        if stock is None:
            raise TypeError(f"{path}: attention {type(attn).__name__} has no head-pruned variant")
        new = HEAD_PRUNED_VIT_ATTENTION[stock](attn.config, num_heads=len(kept), head_dim=self.head_dim)
        new.qkv, new.projection = attn.qkv, attn.projection
        new.train(attn.training)
        parent, child = path.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, new)

    def family_stacks(self) -> dict[str, str]:
        return {"vision": self.layers_path}

    def feature_blocks(self) -> list[FeatureBlock]:
        return [FeatureBlock("vision", i, f"{self.layers_path}.{i}") for i in range(0, self.n_layers, 2)]
