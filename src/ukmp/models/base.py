"""The adapter contract: everything the rest of ukmp may ask about a model's architecture.

A **part** is one prunable stack at a path inside the model (a ViT, a T5 encoder-decoder, a Llama or OPT decoder):
it enumerates its :class:`~ukmp.groups.PrunableGroup` s from the config, updates the attention modules whose head
count changed, and names its blocks (for distillation) and the token stream each scored Linear reads. A
**whole-model adapter** (:class:`ModelAdapter`) composes parts and adds what depends on the whole model: the batch
layout, the token masks of each stream, the parameter breakdown per modality and how the model is rebuilt.

The slicing itself (``apply_``, ``mask``, ``removed_weights``) is generic: it only reads the groups' slices, so a
part is mostly a table of module paths and unit shapes.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator, Literal, Mapping

import torch
from torch import nn

from ukmp.groups import PrunableGroup
from ukmp.plan import PlanError, PruningPlan

Layout = Literal["encoder_decoder", "decoder_only"]


@dataclass(frozen=True)
class BatchLayout:
    """What batch builders need to know of a model: where targets sit and how images enter the text."""

    decoder_only: bool  # targets follow the prompt in ``input_ids`` (else: encoder ids + decoder labels)
    image_tokens: int = 0  # image placeholder tokens before the text (0: no image input)
    image_token_id: int | None = None
    image_size: int | None = None  # the vision tower's input size (None: no images)
    patch_size: int | None = None
    qformer_text: bool = False  # the prompt is also tokenised for the Q-Former (InstructBLIP: qformer_input_ids)
    fixed_image_size: bool = False  # one image token per patch (LLaVA): images are always read at image_size
    # How one image enters the text and how its pixels are made, as the model's own processor does it (the defaults
    # are BLIP-2's and LLaVA's). The image tokens are written as ``image_prefix + [image token] * image_tokens +
    # image_suffix`` (token strings, looked up in the tokenizer), wherever the prompt places the image.
    image_prefix: tuple[str, ...] = ()  # SmolVLM / Idefics3: ("<fake_token_around_image>", "<global-img>")
    image_suffix: tuple[str, ...] = ()  # SmolVLM / Idefics3: ("<fake_token_around_image>",)
    image_mean: tuple[float, ...] | None = None  # per-channel normalisation (None: CLIP's mean and std)
    image_std: tuple[float, ...] | None = None
    image_resize: str = "bicubic"  # "bicubic": one square resize; "idefics3": longest edge, then square (Lanczos)
    # Qwen-VL: batches read each image near its own aspect ratio (sides multiples of patch_size, at most
    # image_size^2 pixels; one image token per patch_size^2 pixels), so a batch mixes resolutions: the pixels are
    # zero-padded to the largest and ``image_sizes [B, 2]`` says each one's (height, width)
    native_resolution: bool = False

    @property
    def has_images(self) -> bool:
        return self.image_size is not None


@dataclass
class RemovedSlice:
    """What :meth:`ModelAdapter.apply_` cut out of one Linear: the rows (``dim=0``) or columns (``dim=1``)."""

    module: str
    dim: int
    kept: torch.Tensor  # original indices kept along ``dim`` (sorted)
    removed: torch.Tensor  # original indices removed along ``dim`` (sorted)
    weight: torch.Tensor  # the removed slice of the dense weight (rows: [n_removed, in], cols: [out, n_removed])
    bias: torch.Tensor | None = None  # removed bias entries (rows only)


@dataclass
class RemovedWeights:
    slices: dict[str, RemovedSlice] = field(default_factory=dict)

    def __contains__(self, module: str) -> bool:
        return module in self.slices

    def __getitem__(self, module: str) -> RemovedSlice:
        return self.slices[module]

    def numel(self) -> int:
        return sum(s.weight.numel() + (0 if s.bias is None else s.bias.numel()) for s in self.slices.values())


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied tensors counted once), meta tensors included."""
    return sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates shared Parameters


@dataclass(frozen=True)
class FeatureBlock:
    """One block whose output hidden state progressive distillation may supervise."""

    family: str  # "vision", "encoder", "decoder" (a decoder-only LM's halves take the last two roles)
    index: int  # the block's index inside its stack (the key of the feature: "{family}.{index}")
    path: str  # module path of the block


class Part(ABC):
    """One prunable stack at ``prefix`` inside a model. Subclasses fill the four methods below."""

    modality = "language"

    def __init__(self, config, prefix: str):
        self.config = config
        self.prefix = prefix

    @abstractmethod
    def groups(self) -> list[PrunableGroup]:
        """The prunable groups of this stack, derived from its config alone."""

    def update_attention_(self, model: nn.Module, group: PrunableGroup, kept: list[int]) -> None:
        """Make the attention that owns head group ``group`` work with ``kept`` units (weights already sliced)."""

    def feature_blocks(self) -> list[FeatureBlock]:
        """Blocks whose outputs distillation may supervise (already thinned: even ViT blocks, odd LM blocks)."""
        return []

    def family_stacks(self) -> dict[str, str]:
        """{feature family: path of the stack whose block ``i`` is ``f"{path}.{i}"``}."""
        return {}

    def streams(self) -> dict[str, str]:
        """{Linear path: token stream it reads} for every Linear of the groups (default: one stream)."""
        return {m: self.modality for g in self.groups() for m in g.linear_modules()}

    def install_attention_(self, model: nn.Module) -> None:
        """Called once after slicing, and after loading a pruned model (default: nothing to install)."""

    def unit_notes(self) -> dict[str, str]:
        """{group kind: what one unit is}, where the kind's name does not say it (a KV group of r query heads)."""
        return {}


class LayeredPart(Part):
    """A stack of ``n_layers`` identical layers: its groups are :meth:`layer_groups` of each layer, in order."""

    n_layers: int

    @abstractmethod
    def layer_groups(self, i: int) -> list[PrunableGroup]:
        """The prunable groups of layer ``i``."""

    def groups(self) -> list[PrunableGroup]:
        return [g for i in range(self.n_layers) for g in self.layer_groups(i)]


class ModelAdapter(ABC):
    """Architecture of one whole model, composed of :class:`Part` s.

    Subclasses set ``name``, ``layout`` and ``parts`` and implement :meth:`stream_masks`. Group ids must be unique
    across parts."""

    name = "abstract"
    layout: Layout = "decoder_only"
    drops_layers = False  # whether apply_ honours a plan's drop_layers (the subclass truncates, then slices)
    modalities: tuple[str, ...] = ("language",)

    def __init__(self, config):
        self.config = config
        self.parts: list[Part] = []

    # ------------------------------------------------------------------ structure
    def groups(self) -> list[PrunableGroup]:
        out: list[PrunableGroup] = []
        for p in self.parts:
            out += p.groups()
        return out

    @property
    def group_kinds(self) -> tuple[str, ...]:
        kinds: list[str] = []
        for g in self.groups():
            if g.kind not in kinds:
                kinds.append(g.kind)
        return tuple(kinds)

    def _part_of(self, group: PrunableGroup) -> Part:
        for p in self.parts:
            if group.slices and (not p.prefix or group.slices[0].module.startswith(p.prefix + ".")):
                return p
        raise ValueError(f"group {group.id!r}: no part owns it")

    def lora_targets(self) -> list[str]:
        """Every Linear of the prunable groups (bridges, embeddings and heads stay frozen)."""
        return [m for g in self.groups() for m in g.linear_modules()]

    @staticmethod
    def attention_module(group: PrunableGroup) -> str | None:
        """Path of the attention module that owns a head group (``None`` for channel groups)."""
        if group.unit_type != "heads":
            return None
        return group.slices[-1].module.rsplit(".", 1)[0]

    @staticmethod
    def output_slice(group: PrunableGroup):
        """The column slice of the group's output projection (o / projection / wo / fc2 / down_proj)."""
        return group.slices[-1]

    def feature_blocks(self) -> list[FeatureBlock]:
        out: list[FeatureBlock] = []
        for p in self.parts:
            out += p.feature_blocks()
        return out

    def family_stacks(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for p in self.parts:
            out.update(p.family_stacks())
        return out

    def streams(self) -> dict[str, str]:
        """{Linear path: stream} for every Linear of every group (which token mask applies to its input)."""
        out: dict[str, str] = {}
        for p in self.parts:
            out.update(p.streams())
        return out

    @abstractmethod
    def stream_masks(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """{stream: [B, L] mask of the real tokens, or None when every token is real} for one batch."""

    def modality_of_param(self, name: str) -> str:
        for p in self.parts:
            if not p.prefix or name.startswith(p.prefix + "."):
                return p.modality
        return "bridge"

    def parameter_breakdown(self, model: nn.Module) -> dict[str, int]:
        out = {m: 0 for m in self.modalities}
        out.setdefault("bridge", 0)
        for n, p in model.named_parameters():  # named_parameters() de-duplicates shared Parameters
            m = self.modality_of_param(n)
            out[m] = out.get(m, 0) + p.numel()
        return out

    def install_attention_(self, model: nn.Module) -> None:
        for p in self.parts:
            p.install_attention_(model)

    def unit_notes(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for p in self.parts:
            out.update(p.unit_notes())
        return out

    def batch_layout(self) -> BatchLayout:
        return BatchLayout(decoder_only=self.layout == "decoder_only")

    def build_processor(self, tokenizer, corpus=None):
        """The processor of a random-weights build around ``tokenizer`` (a plain LM: the tokenizer itself);
        ``corpus``: the texts ``tokenizer`` was trained on, for a model that needs a second tokenizer."""
        return tokenizer

    def load_processor(self, source: str):
        """The processor saved at ``source`` (a directory or a hub id) when this model type needs its own loader;
        ``None`` (the default): ``AutoProcessor`` / the tokenizer classes load it."""
        return None

    def unused_vision_layers(self) -> list[int]:
        """Vision layers whose output never reaches the model's output (none unless an adapter says so)."""
        return []

    def drop_unused(self, model: nn.Module) -> dict[str, dict[str, int]]:
        """The ``drop_layers`` entry of a plan that removes :meth:`unused_vision_layers` (``{}``: nothing to drop)."""
        return {}

    def language_model(self, model: nn.Module) -> nn.Module:
        """The language model inside ``model`` (the model itself for a plain LM)."""
        lm = [p for p in self.parts if p.modality == "language"]
        return model.get_submodule(lm[0].prefix) if lm and lm[0].prefix else model

    # ------------------------------------------------------------------ checks
    def _check_dense(self, model: nn.Module, groups: list[PrunableGroup], plan: PruningPlan) -> None:
        for g in groups:
            if g.id not in plan.keep:
                continue
            for s in g.slices:
                t = getattr(model.get_submodule(s.module), s.param)
                expected = s.offset + g.n_units * s.unit_size
                if t is None or t.shape[s.dim] < expected:
                    raise PlanError(
                        f"model: {s.name} has shape {tuple(t.shape) if t is not None else None}; group {g.id!r} "
                        f"expects the dense width (is the model already pruned?)"
                    )

    # ------------------------------------------------------------------ index bookkeeping
    def _param_keep(self, model: nn.Module, groups: list[PrunableGroup], plan: PruningPlan):
        """{(module, param): (dim, kept_idx, removed_idx)} for every parameter touched by a pruned group."""
        out: dict[tuple[str, str], tuple[int, torch.Tensor, torch.Tensor]] = {}
        for g in groups:
            if g.id not in plan.keep or not plan.is_pruned(g):
                continue
            kept_u = torch.tensor(sorted(plan.kept(g)), dtype=torch.long)
            rem_u = torch.tensor(plan.removed(g), dtype=torch.long)
            per_param: dict[tuple[str, str], list] = {}
            for s in g.slices:
                key = (s.module, s.param)
                entry = per_param.setdefault(key, [s.dim, [], []])
                entry[1].append(s.indices(kept_u))
                entry[2].append(s.indices(rem_u))
            for key, (dim, ks, rs) in per_param.items():
                size = getattr(model.get_submodule(key[0]), key[1]).shape[dim]
                rem = torch.cat(rs).sort().values
                keep_mask = torch.ones(size, dtype=torch.bool)
                keep_mask[rem] = False
                out[key] = (dim, keep_mask.nonzero().squeeze(1), rem)
        return out

    # ------------------------------------------------------------------ pruning
    def apply_(self, model: nn.Module, plan: PruningPlan) -> RemovedWeights:
        """Slice every coupled weight and update every dependent attribute; return what was removed.

        Validation happens before anything is touched, so a bad plan leaves the model unchanged. Works on meta
        tensors too (structure only), which is how :func:`ukmp.io.load_pruned` rebuilds a pruned model.
        """
        groups = self.groups()
        plan.validate(groups)
        if plan.drop_layers and not self.drops_layers:
            raise PlanError(f"plan: drop_layers {sorted(plan.drop_layers)} but {self.name} has no layers to drop")
        self._check_dense(model, groups, plan)
        keep = self._param_keep(model, groups, plan)
        self.add_out_biases_(model, plan.out_bias)
        removed = RemovedWeights()
        with torch.no_grad():
            for (mod_path, pname), (dim, kept, rem) in keep.items():
                lin = model.get_submodule(mod_path)
                t = getattr(lin, pname)
                dev_kept, dev_rem = kept.to(t.device), rem.to(t.device)
                entry = removed.slices.get(mod_path)
                if pname == "weight":
                    w_rem = t.index_select(dim, dev_rem).detach().clone()
                    if entry is None:
                        removed.slices[mod_path] = RemovedSlice(mod_path, dim, kept, rem, w_rem)
                    else:
                        entry.weight = w_rem
                    if dim == 0:
                        lin.out_features = len(kept)
                    else:
                        lin.in_features = len(kept)
                else:
                    b_rem = t.index_select(0, dev_rem).detach().clone()
                    if entry is None:
                        removed.slices[mod_path] = RemovedSlice(mod_path, dim, kept, rem, torch.empty(0), b_rem)
                    else:
                        entry.bias = b_rem
                new = nn.Parameter(t.index_select(dim, dev_kept).clone(), requires_grad=t.requires_grad)
                setattr(lin, pname, new)
        for g in groups:
            if g.id in plan.keep and plan.is_pruned(g) and g.unit_type == "heads":
                self._part_of(g).update_attention_(model, g, sorted(plan.kept(g)))
        self.install_attention_(model)
        return removed

    @staticmethod
    def add_out_biases_(model: nn.Module, modules: list[str]) -> None:
        """Give each named output projection a zero bias if it has none (FLAP's bias compensation)."""
        for path in modules:
            lin = model.get_submodule(path)
            if lin.bias is None:
                w = lin.weight
                lin.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                        requires_grad=w.requires_grad)

    def removed_weights(self, model: nn.Module, plan: PruningPlan) -> RemovedWeights:
        """What :meth:`apply_` would return, read from a dense model without changing it (recovery's P tensors)."""
        groups = self.groups()
        plan.validate(groups)
        self._check_dense(model, groups, plan)
        removed = RemovedWeights()
        with torch.no_grad():
            for (mod_path, pname), (dim, kept, rem) in self._param_keep(model, groups, plan).items():
                t = getattr(model.get_submodule(mod_path), pname)
                part = t.index_select(dim if pname == "weight" else 0, rem.to(t.device)).detach().clone()
                entry = removed.slices.setdefault(mod_path, RemovedSlice(mod_path, dim, kept, rem, torch.empty(0)))
                if pname == "weight":
                    entry.weight = part
                else:
                    entry.bias = part
        return removed

    # ------------------------------------------------------------------ masking oracle
    @contextlib.contextmanager
    def mask(self, model: nn.Module, plan: PruningPlan) -> Iterator[nn.Module]:
        """Zero (without slicing) every weight that :meth:`apply_` would remove; restore on exit."""
        groups = self.groups()
        plan.validate(groups)
        keep = self._param_keep(model, groups, plan)
        saved = []
        with torch.no_grad():
            for (mod_path, pname), (dim, _kept, rem) in keep.items():
                t = getattr(model.get_submodule(mod_path), pname)
                idx = rem.to(t.device)
                saved.append((t, dim, idx, t.index_select(dim, idx).clone()))
                t.index_fill_(dim, idx, 0.0)
        try:
            yield model
        finally:
            with torch.no_grad():
                for t, dim, idx, vals in saved:
                    t.index_copy_(dim, idx, vals)

    # ------------------------------------------------------------------ accounting
    def unit_counts(self, model: nn.Module) -> dict[str, int]:
        """Current number of units per group, read from the (possibly pruned) weights."""
        out = {}
        for g in self.groups():
            s = self.output_slice(g)  # the output projection's column slice: exactly n_units * unit_size wide
            out[g.id] = getattr(model.get_submodule(s.module), s.param).shape[s.dim] // s.unit_size
        return out
