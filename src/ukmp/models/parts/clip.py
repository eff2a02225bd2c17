"""The CLIP vision tower (``CLIPVisionModel``, LLaVA's ViT): separate q/k/v/out projections with biases, fc1/fc2.

Groups ``vision.layers.{i}.attn`` (heads: q, k, v rows and biases + ``out_proj`` columns) and
``vision.layers.{i}.mlp`` (channels: ``fc1`` row and bias + ``fc2`` column). ``CLIPAttention`` reshapes with
``(*shape, -1, head_dim)``, so the stock attention runs on fewer heads unchanged.

:meth:`ClipVisionPart.truncate_` drops the layers after the ones a model reads (LLaVA reads the hidden state of
``vision_feature_layer``, by default the second last): it shortens the ``ModuleList`` and ``num_hidden_layers``.
"""

from __future__ import annotations

from torch import nn

from ukmp.groups import ParamSlice, PrunableGroup
from ukmp.models.base import FeatureBlock, LayeredPart


class ClipVisionPart(LayeredPart):
    modality = "vision"
    # one layer's attention Linears by role, relative to the layer (for writers that rename them: the mmproj GGUF)
    ATTENTION = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                 "out": "self_attn.out_proj"}

    def __init__(self, config, prefix: str, gid: str = "vision"):
        super().__init__(config, prefix)
        self.gid = gid
        self.layers_path = f"{prefix}.encoder.layers"
        self.n_layers = config.num_hidden_layers
        self.width = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.inter = config.intermediate_size

    def layer_groups(self, i: int) -> list[PrunableGroup]:
        a, L, E, hd = f"{self.layers_path}.{i}.self_attn", f"{self.layers_path}.{i}", self.width, self.head_dim
        heads = [ParamSlice(f"{a}.{n}", p, 0, hd) for p in ("weight", "bias") for n in ("q_proj", "k_proj", "v_proj")]
        heads.append(ParamSlice(f"{a}.out_proj", "weight", 1, hd))
        mlp = (ParamSlice(f"{L}.mlp.fc1", "weight", 0, 1), ParamSlice(f"{L}.mlp.fc1", "bias", 0, 1),
               ParamSlice(f"{L}.mlp.fc2", "weight", 1, 1))
        return [
            PrunableGroup(f"{self.gid}.layers.{i}.attn", "vit_heads", "heads", "vision", i, self.n_heads,
                          4 * E * hd + 3 * hd, tuple(heads)),
            PrunableGroup(f"{self.gid}.layers.{i}.mlp", "vit_mlp", "channels", "vision", i, self.inter, 2 * E + 1,
                          mlp),
        ]

    def layer_params(self, model: nn.Module, first: int) -> int:
        """Parameters of layers ``first ...`` of the stack (what :meth:`truncate_` to ``first`` layers removes)."""
        layers = model.get_submodule(self.layers_path)
        return sum(p.numel() for layer in list(layers)[first:] for p in layer.parameters())

    def truncate_(self, model: nn.Module, keep: int) -> None:
        """Keep the first ``keep`` layers; every config of the tower follows (a no-op when already that short)."""
        layers = model.get_submodule(self.layers_path)
        if len(layers) < keep:
            raise ValueError(f"{self.layers_path}: has {len(layers)} layers, cannot keep {keep}")
        del layers[keep:]
        for m in model.get_submodule(self.prefix).modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "num_hidden_layers"):
                cfg.num_hidden_layers = keep
        self.config.num_hidden_layers = keep

    def family_stacks(self) -> dict[str, str]:
        return {"vision": self.layers_path}

    def feature_blocks(self) -> list[FeatureBlock]:
        return [FeatureBlock("vision", i, f"{self.layers_path}.{i}") for i in range(0, self.n_layers, 2)]
