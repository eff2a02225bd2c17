"""LLaVA (``LlavaForConditionalGeneration``): a CLIP vision tower (or SigLIP's: CLIP's module names, no class
token), a two-layer MLP projector and a Llama-family language model (transformers 5 nests ``model.vision_tower``,
``model.multi_modal_projector`` and ``model.language_model``, a base model, under ``model``; ``lm_head`` sits at the
top).

Group ids::

    vision.layers.{i}.attn     CLIP heads (q, k, v rows and biases + out_proj columns)
    vision.layers.{i}.mlp      CLIP MLP channels (fc1 row + bias, fc2 column)
    lm.layers.{i}.attn         language-model KV groups
    lm.layers.{i}.mlp          language-model MLP channels

The language model reads the vision hidden state of ``vision_feature_layer`` (LLaVA-1.5: -2), so the vision layers
after it never reach the output: :meth:`LlavaAdapter.unused_vision_layers` names them and a plan's ``drop_layers``
(:meth:`LlavaAdapter.drop_unused`) removes them outright in :meth:`LlavaAdapter.apply_`, which also rewrites
``vision_feature_layer`` as an absolute index (a negative one would then point at another layer).
Never pruned: the patch and position embeddings, layer norms, the projector, embeddings and ``lm_head``.
"""

from __future__ import annotations

from torch import nn

from ukmp.models.base import FeatureBlock, RemovedWeights
from ukmp.models.parts.clip import ClipVisionPart
from ukmp.models.processors import class_tokens
from ukmp.models.vision_decoder import FixedSizeVisionDecoder
from ukmp.plan import PlanError, PruningPlan


class LlavaAdapter(FixedSizeVisionDecoder):
    vision_prefix = "model.vision_tower"
    drops_layers = True

    def image_tokens(self) -> int:
        """One token per patch, plus CLIP's CLS when the strategy is ``full``; ``default`` drops the first token (the
        CLS of a CLIP tower, a patch of a tower without one, as the stock model does: a SigLIP tower reads ``full``)."""
        vc = self.config.vision_config
        patches = (int(vc.image_size) // int(vc.patch_size)) ** 2
        return patches + class_tokens(vc) - (1 if self.config.vision_feature_select_strategy == "default" else 0)

    def build_processor(self, tokenizer, corpus=None):
        from ukmp.models.processors import build_llava_processor

        return build_llava_processor(tokenizer, self.config)

    def model_class(self):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    # ------------------------------------------------------------------ layers that never reach the output
    def feature_layers(self) -> list[int]:
        """Absolute indices into the vision tower's hidden states (0: embeddings, i: after layer i-1) it reads."""
        fl = self.config.vision_feature_layer
        n = self.vision.n_layers
        return [i if i >= 0 else n + 1 + i for i in ([fl] if isinstance(fl, int) else list(fl))]

    def unused_vision_layers(self) -> list[int]:
        """Vision layers whose output the language model never sees (LLaVA-1.5: the last one)."""
        return list(range(max(self.feature_layers()), self.vision.n_layers))

    def feature_blocks(self) -> list[FeatureBlock]:
        """The parts' blocks, less the unused vision layers (a teacher that keeps them and a student without them
        supervise the same blocks)."""
        unused = set(self.unused_vision_layers())
        return [b for b in super().feature_blocks() if not (b.family == "vision" and b.index in unused)]

    def drop_unused(self, model: nn.Module) -> dict[str, dict[str, int]]:
        """The ``drop_layers`` entry of a plan that removes :meth:`unused_vision_layers` (``{}`` when none)."""
        unused = self.unused_vision_layers()
        if not unused:
            return {}
        return {self.vision.gid: {"keep": unused[0], "params": self.vision.layer_params(model, unused[0])}}

    def truncate_vision_(self, model: nn.Module, keep: int) -> None:
        """Drop the vision layers from ``keep`` on, with every dependent attribute (``num_hidden_layers``,
        ``vision_feature_layer`` made absolute)."""
        absolute = self.feature_layers()
        if max(absolute) > keep:
            raise PlanError(f"plan: drop_layers keeps {keep} vision layers but the model reads hidden state "
                            f"{max(absolute)}")
        self.vision.truncate_(model, keep)
        fl = absolute[0] if isinstance(self.config.vision_feature_layer, int) else absolute
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "vision_feature_layer"):
                cfg.vision_feature_layer = fl
        self.config.vision_feature_layer = fl
        self.vision = ClipVisionPart(self.config.vision_config, self.vision.prefix, self.vision.gid)
        self.parts = [self.vision, self.lm]

    def apply_(self, model: nn.Module, plan: PruningPlan) -> RemovedWeights:
        """Drop the plan's unused layers (nothing when the model is already that short), then slice."""
        extra = set(plan.drop_layers) - {self.vision.gid}
        if extra:
            raise PlanError(f"plan: drop_layers names unknown stacks {sorted(extra)} (this model: "
                            f"{self.vision.gid!r})")
        d = plan.drop_layers.get(self.vision.gid)
        if d is not None:
            plan.validate(self.groups())
            dropped = [gid for gid in plan.keep if any(gid.startswith(f"{self.vision.gid}.layers.{i}.")
                                                         for i in range(int(d["keep"]), self.vision.n_layers))]
            if dropped:
                raise PlanError(f"plan: group {dropped[0]!r} belongs to a layer that drop_layers removes")
            if self.vision.n_layers > int(d["keep"]):
                self.truncate_vision_(model, int(d["keep"]))
        return super().apply_(model, plan)
