"""The Qwen-VL vision tower (``Qwen2_5_VisionTransformerPretrainedModel``; Qwen3-VL's ``Qwen3VLVisionModel`` shares
its attention): RMS-normed blocks under ``blocks``, each with one fused ``attn.qkv`` Linear, an ``attn.proj`` output
and an MLP, then a patch merger that is never pruned.

Group ids ``vision.layers.{i}.attn`` and ``vision.layers.{i}.mlp``:

* attention unit = one head. ``qkv`` is ``Linear(dim, 3 * dim, bias=True)`` whose output the attention reshapes as
  ``(seq, 3, num_heads, head_dim)``: rows ``[0, dim)`` are the queries, ``[dim, 2 dim)`` the keys, ``[2 dim, 3 dim)``
  the values, head ``h`` owning rows ``h * head_dim ...`` of each block. Removing head ``h`` removes three row blocks
  of that one Linear (weight and bias: offsets 0, ``dim`` and ``2 dim``) and the matching ``proj`` columns; the
  kept rows stay in (q block, k block, v block) order, so the stock reshape reads them right once the module's
  ``num_heads`` says how many heads are left (:meth:`QwenVisionPart.update_attention_`). The head size and the
  softmax scale were fixed at construction (``dim // num_heads``) and do not change; the 2-D rotary tables are per
  head and shared by every head, and the windowed / full attention split (``fullatt_block_indexes``) is a token
  permutation, untouched by head removal.
* MLP unit = one channel: Qwen2.5-VL's gated MLP (``gate_proj``, ``up_proj`` rows and biases, ``down_proj``
  column; :data:`GATED_MLP`) or Qwen3-VL's plain one (``linear_fc1`` row and bias, ``linear_fc2`` column;
  :data:`PLAIN_MLP`).

The merger reads the last block's output, so no block is ever unused (nothing to drop).
"""

from __future__ import annotations

from torch import nn

from ukmp.groups import ParamSlice, PrunableGroup
from ukmp.models.base import FeatureBlock, LayeredPart

GATED_MLP = (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")  # Qwen2.5-VL
PLAIN_MLP = (("mlp.linear_fc1",), "mlp.linear_fc2")  # Qwen3-VL


class QwenVisionPart(LayeredPart):
    modality = "vision"

    def __init__(self, config, prefix: str, mlp: tuple[tuple[str, ...], str] = GATED_MLP, gid: str = "vision"):
        super().__init__(config, prefix)
        self.gid, self.mlp_in, self.mlp_out = gid, mlp[0], mlp[1]
        self.layers_path = f"{prefix}.blocks"
        self.n_layers = int(config.depth)
        self.width = int(config.hidden_size)
        self.n_heads = int(config.num_heads)
        if self.width % self.n_heads:
            raise ValueError(f"model config ({config.model_type}): hidden_size {self.width} is not a multiple of "
                             f"num_heads {self.n_heads}")
        self.head_dim = self.width // self.n_heads  # as the attention computes it (no head_dim in the config)
        self.inter = int(config.intermediate_size)

    def layer_groups(self, i: int) -> list[PrunableGroup]:
        L, E, hd = f"{self.layers_path}.{i}", self.width, self.head_dim
        qkv = f"{L}.attn.qkv"
        heads = [ParamSlice(qkv, p, 0, hd, off) for p in ("weight", "bias") for off in (0, E, 2 * E)]
        heads.append(ParamSlice(f"{L}.attn.proj", "weight", 1, hd))
        mlp = [ParamSlice(f"{L}.{m}", p, 0, 1) for m in self.mlp_in for p in ("weight", "bias")]
        mlp.append(ParamSlice(f"{L}.{self.mlp_out}", "weight", 1, 1))
        n_in = len(self.mlp_in)
        return [
            PrunableGroup(f"{self.gid}.layers.{i}.attn", "vit_heads", "heads", "vision", i, self.n_heads,
                          4 * E * hd + 3 * hd, tuple(heads)),
            PrunableGroup(f"{self.gid}.layers.{i}.mlp", "vit_mlp", "channels", "vision", i, self.inter,
                          (n_in + 1) * E + n_in, tuple(mlp)),
        ]

    def update_attention_(self, model: nn.Module, group: PrunableGroup, kept: list[int]) -> None:
        """The attention reshapes with ``self.num_heads``: set it to the kept count (``head_dim`` and the scale stay;
        the config keeps the dense count, which the rotary tables and a reload read)."""
        attn = model.get_submodule(group.slices[-1].module.rsplit(".", 1)[0])
        attn.num_heads = len(kept)

    def unit_notes(self) -> dict[str, str]:
        return {"vit_heads": "one head: q, k and v row blocks of the fused qkv (weight and bias) + proj columns"}

    def family_stacks(self) -> dict[str, str]:
        return {"vision": self.layers_path}

    def feature_blocks(self) -> list[FeatureBlock]:
        return [FeatureBlock("vision", i, f"{self.layers_path}.{i}") for i in range(0, self.n_layers, 2)]
