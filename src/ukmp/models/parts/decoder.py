"""Decoder-only language models: the Llama family (Llama, Mistral, Qwen2: grouped-query attention) and OPT.

One table per family says where the Linears sit; the rest is shared. Groups ``lm.layers.{i}.attn`` and
``lm.layers.{i}.mlp``:

* attention unit = one **KV group**: a key/value head and the ``num_attention_heads / num_key_value_heads`` query
  heads that read it (query heads ``r*g ... r*g + r - 1`` for ``r`` per group), owning those q rows, its k and v
  rows (and their biases) and the matching o columns. Plain multi-head attention (OPT, or Llama with as many KV
  heads as query heads) has one head per unit. Removing whole groups keeps the query/KV ratio, so the stock
  attention (rotary embeddings, the GQA repeat, eager and sdpa, the KV cache) runs unchanged.
* MLP unit = one channel: gate/up rows (Llama) or the ``fc1`` row and bias (OPT), and the down/``fc2`` column.

Progressive distillation supervises the odd blocks; the first half of them takes the role of the paper's encoder
stages (Table A sub-stages 3-4) and the second half that of its decoder stages (5-6).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ukmp.groups import ParamSlice, PrunableGroup
from ukmp.models.base import FeatureBlock, LayeredPart
from ukmp.models.parts.t5 import odd_blocks


@dataclass(frozen=True)
class DecoderTable:
    """Where one family keeps its Linears, relative to the language model's path."""

    layers: str  # e.g. "model.layers"
    attn: str  # attention module inside a layer
    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]  # row-pruned MLP Linears, relative to the layer
    mlp_out: str  # the column-pruned MLP Linear, relative to the layer
    heads_attr: str | None = None  # attention attribute holding the head count (OPT: num_heads), updated on apply_


LLAMA = DecoderTable("model.layers", "self_attn", "q_proj", "k_proj", "v_proj", "o_proj",
                     ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")
OPT = DecoderTable("model.decoder.layers", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
                   ("fc1",), "fc2", heads_attr="num_heads")


class DecoderPart(LayeredPart):
    """A decoder-only language model at ``prefix`` ("" for a plain causal LM, "language_model" inside a VLM)."""

    modality = "language"

    def __init__(self, config, prefix: str, table: DecoderTable, gid: str = "lm"):
        super().__init__(config, prefix)
        self.table, self.gid = table, gid
        self.layers_path = f"{prefix}.{table.layers}" if prefix else table.layers
        self.n_layers = config.num_hidden_layers
        self.width = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        if self.n_heads % self.n_kv:
            raise ValueError(f"model config ({config.model_type}): num_attention_heads {self.n_heads} is not a "
                             f"multiple of num_key_value_heads {self.n_kv}; KV groups would be uneven")
        self.per_group = self.n_heads // self.n_kv
        self.head_dim = getattr(config, "head_dim", None) or self.width // self.n_heads
        self.inter = config.ffn_dim if table is OPT else config.intermediate_size
        self.qkv_bias, self.mlp_bias = self._biases(config)

    def _biases(self, config) -> tuple[bool, bool]:
        t = config.model_type
        if self.table is OPT:
            return bool(getattr(config, "enable_bias", True)), bool(getattr(config, "enable_bias", True))
        if t in ("qwen2", "qwen2_5_vl_text"):  # Qwen2 (and Qwen2.5-VL's Qwen2): q/k/v biases, no other bias
            return True, False
        return bool(getattr(config, "attention_bias", False)), bool(getattr(config, "mlp_bias", False))

    def layer_path(self, i: int) -> str:
        return f"{self.layers_path}.{i}"

    def layer_groups(self, i: int) -> list[PrunableGroup]:
        t, L, E = self.table, self.layer_path(i), self.width
        a = f"{L}.{t.attn}"
        qs, kvs = self.per_group * self.head_dim, self.head_dim
        heads = [ParamSlice(f"{a}.{t.q}", "weight", 0, qs), ParamSlice(f"{a}.{t.k}", "weight", 0, kvs),
                 ParamSlice(f"{a}.{t.v}", "weight", 0, kvs)]
        if self.qkv_bias:
            heads += [ParamSlice(f"{a}.{t.q}", "bias", 0, qs), ParamSlice(f"{a}.{t.k}", "bias", 0, kvs),
                      ParamSlice(f"{a}.{t.v}", "bias", 0, kvs)]
        heads.append(ParamSlice(f"{a}.{t.o}", "weight", 1, qs))
        per_head = 2 * E * qs + 2 * E * kvs + ((qs + 2 * kvs) if self.qkv_bias else 0)
        mlp = [ParamSlice(f"{L}.{m}", "weight", 0, 1) for m in t.mlp_in]
        if self.mlp_bias:
            mlp += [ParamSlice(f"{L}.{m}", "bias", 0, 1) for m in t.mlp_in]
        mlp.append(ParamSlice(f"{L}.{t.mlp_out}", "weight", 1, 1))
        per_channel = (len(t.mlp_in) + 1) * E + (len(t.mlp_in) if self.mlp_bias else 0)
        return [
            PrunableGroup(f"{self.gid}.layers.{i}.attn", "lm_heads", "heads", "language", i, self.n_kv, per_head,
                          tuple(heads)),
            PrunableGroup(f"{self.gid}.layers.{i}.mlp", "lm_mlp", "channels", "language", i, self.inter,
                          per_channel, tuple(mlp)),
        ]

    def streams(self) -> dict[str, str]:
        return {m: "lm" for g in self.groups() for m in g.linear_modules()}

    def update_attention_(self, model: nn.Module, group: PrunableGroup, kept: list[int]) -> None:
        if self.table.heads_attr is not None:
            attn = model.get_submodule(group.slices[-1].module.rsplit(".", 1)[0])
            setattr(attn, self.table.heads_attr, len(kept) * self.per_group)

    def unit_notes(self) -> dict[str, str]:
        r = self.per_group
        return {"lm_heads": f"KV group of {r} query heads" if r > 1 else "one head (q, k, v rows and o columns)"}

    def family_stacks(self) -> dict[str, str]:
        return {"encoder": self.layers_path, "decoder": self.layers_path}

    def feature_blocks(self) -> list[FeatureBlock]:
        odd = odd_blocks(self.n_layers)
        h = (len(odd) + 1) // 2
        return ([FeatureBlock("encoder", i, self.layer_path(i)) for i in odd[:h]]
                + [FeatureBlock("decoder", i, self.layer_path(i)) for i in odd[h:]])
