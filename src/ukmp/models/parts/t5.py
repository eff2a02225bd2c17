"""The T5 encoder-decoder language model (FlanT5 inside BLIP-2 and InstructBLIP).

Groups ``text_enc.block.{i}.attn`` / ``.ffn`` and ``text_dec.block.{i}.self_attn`` / ``.cross_attn`` / ``.ffn``:
heads own q, k, v rows and o columns; FFN channels own ``wi_0``/``wi_1`` (or ``wi``) rows and the ``wo`` column.
The relative-attention-bias tables keep every original head; head-pruned layers select theirs through the
head-aware attention functions of :mod:`ukmp.models.attention`.
"""

from __future__ import annotations

import torch
from torch import nn

from ukmp.groups import ParamSlice, PrunableGroup
from ukmp.models.base import FeatureBlock, Part


def odd_blocks(n: int) -> tuple[int, ...]:
    """Blocks 1, 3, 5, ... of an ``n``-block stack (the last block when there is no odd one)."""
    return tuple(range(1, n, 2)) or (n - 1,)


class T5Part(Part):
    modality = "language"

    def __init__(self, config, prefix: str = "language_model"):
        super().__init__(config, prefix)
        self.enc_path, self.dec_path = f"{prefix}.encoder", f"{prefix}.decoder"
        self.enc_layers = config.num_layers
        self.dec_layers = config.num_decoder_layers if config.num_decoder_layers is not None else config.num_layers
        self.width = config.d_model
        self.n_heads = config.num_heads
        self.d_kv = config.d_kv
        self.d_ff = config.d_ff
        self.gated = bool(getattr(config, "is_gated_act", False))

    def _heads(self, gid: str, kind: str, path: str, i: int) -> PrunableGroup:
        d = self.d_kv
        slices = tuple(ParamSlice(f"{path}.{n}", "weight", 0, d) for n in ("q", "k", "v")) + (
            ParamSlice(f"{path}.o", "weight", 1, d),
        )
        return PrunableGroup(gid, kind, "heads", "language", i, self.n_heads, 4 * self.width * d, slices)

    def _ffn(self, gid: str, kind: str, path: str, i: int) -> PrunableGroup:
        ins = ("wi_0", "wi_1") if self.gated else ("wi",)
        slices = tuple(ParamSlice(f"{path}.{n}", "weight", 0, 1) for n in ins) + (
            ParamSlice(f"{path}.wo", "weight", 1, 1),
        )
        return PrunableGroup(gid, kind, "channels", "language", i, self.d_ff, (len(ins) + 1) * self.width, slices)

    def groups(self) -> list[PrunableGroup]:
        out: list[PrunableGroup] = []
        for i in range(self.enc_layers):
            b = f"{self.enc_path}.block.{i}.layer"
            out.append(self._heads(f"text_enc.block.{i}.attn", "enc_heads", f"{b}.0.SelfAttention", i))
            out.append(self._ffn(f"text_enc.block.{i}.ffn", "enc_ffn", f"{b}.1.DenseReluDense", i))
        for i in range(self.dec_layers):
            b = f"{self.dec_path}.block.{i}.layer"
            out.append(self._heads(f"text_dec.block.{i}.self_attn", "dec_self_heads", f"{b}.0.SelfAttention", i))
            out.append(self._heads(f"text_dec.block.{i}.cross_attn", "dec_cross_heads", f"{b}.1.EncDecAttention", i))
            out.append(self._ffn(f"text_dec.block.{i}.ffn", "dec_ffn", f"{b}.2.DenseReluDense", i))
        return out

    def streams(self) -> dict[str, str]:
        """Encoder Linears and the cross-attention k/v read the encoder stream; the rest the decoder stream."""
        out: dict[str, str] = {}
        for g in self.groups():
            for m in g.linear_modules():
                cross_kv = g.kind == "dec_cross_heads" and m.rsplit(".", 1)[-1] in ("k", "v")
                out[m] = "encoder" if g.kind.startswith("enc") or cross_kv else "decoder"
        return out

    def update_attention_(self, model: nn.Module, group: PrunableGroup, kept: list[int]) -> None:
        from ukmp.models.attention import KEPT_HEADS, head_aware_implementation, register_attention_functions

        register_attention_functions()
        path = group.slices[-1].module.rsplit(".", 1)[0]
        attn = model.get_submodule(path)
        attn.inner_dim = len(kept) * self.d_kv
        device = attn.q.weight.device if attn.q.weight.device.type != "meta" else "cpu"
        attn.register_buffer(KEPT_HEADS, torch.tensor(kept, dtype=torch.long, device=device), persistent=False)
        stack = model.get_submodule(self.dec_path if path.startswith(self.dec_path + ".") else self.enc_path)
        stack.config._attn_implementation = head_aware_implementation(stack.config._attn_implementation)
        guard_attn_switch(model, [self.enc_path, self.dec_path])

    def family_stacks(self) -> dict[str, str]:
        return {"encoder": f"{self.enc_path}.block", "decoder": f"{self.dec_path}.block"}

    def feature_blocks(self) -> list[FeatureBlock]:
        return ([FeatureBlock("encoder", i, f"{self.enc_path}.block.{i}") for i in odd_blocks(self.enc_layers)]
                + [FeatureBlock("decoder", i, f"{self.dec_path}.block.{i}") for i in odd_blocks(self.dec_layers)])


def guard_attn_switch(model: nn.Module, stack_paths: list[str]) -> None:
    """Keep head-pruned T5 stacks on the head-aware attention after ``model.set_attn_implementation(...)``.

    transformers would set the plain ``eager``/``sdpa`` name on every sub-config, and the plain functions add the
    full-size position bias to the pruned heads. The instance's method is wrapped: it switches as asked, then maps
    the T5 stacks' names back to ``ukmp_eager``/``ukmp_sdpa`` (other implementations raise, naming the value)."""
    from ukmp.models.attention import head_aware_implementation

    if getattr(model, "_ukmp_attn_guard", False) or not hasattr(model, "set_attn_implementation"):
        return
    original = model.set_attn_implementation
    stacks = [m for n, m in model.named_modules() if n in stack_paths]

    def set_attn_implementation(attn_implementation, *args, **kwargs):
        requested = attn_implementation if isinstance(attn_implementation, str) else None
        if requested is not None:
            head_aware_implementation(requested)  # raise before changing anything
        out = original(attn_implementation, *args, **kwargs)
        for stack in stacks:
            stack.config._attn_implementation = head_aware_implementation(stack.config._attn_implementation)
        return out

    model.set_attn_implementation = set_attn_implementation
    model._ukmp_attn_guard = True
