"""Shared set-up for the recovery tests and for the subprocess training script (no pytest import here)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from ukmp.models.blip2 import Blip2T5Adapter
from ukmp.models.build import build_tiny
from ukmp.recover.wr_lora import inject_wr_lora_
from ukmp.testing import random_plan

PLAN_SEED = 3


def pruned_tiny(seed: int = 0, plan_seed: int = PLAN_SEED):
    """(pruned model, RemovedWeights, adapter, plan) of a tiny BLIP-2 cut by a random plan."""
    model, _ = build_tiny(seed=seed)
    adapter = Blip2T5Adapter(model.config)
    plan = random_plan(adapter.groups(), seed=plan_seed)
    removed = adapter.apply_(model, plan)
    return model, removed, adapter, plan


def student_teacher(seed: int = 0, dropout: float = 0.05, plain_lora: bool = False):
    """(student with WR-LoRA injected, dense teacher from the same seed)."""
    student, removed, adapter, _ = pruned_tiny(seed)
    inject_wr_lora_(student, removed, adapter.lora_targets(), dropout=dropout, plain_lora=plain_lora)
    teacher, _ = build_tiny(seed=seed)
    return student, teacher


class SyntheticCaptions(Dataset):
    """Deterministic prefix-LM samples: sample ``i`` depends only on ``i`` (and the model config)."""

    def __init__(self, config, n: int, offset: int = 0, text_len: int = 6, dec_len: int = 5):
        self.cfg, self.n, self.offset, self.text_len, self.dec_len = config, n, offset, text_len, dec_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + self.offset + i)
        cfg = self.cfg
        nq, img = cfg.num_query_tokens, cfg.image_token_index
        size = cfg.vision_config.image_size
        ids = torch.randint(3, img, (nq + self.text_len,), generator=g)
        ids[:nq] = img
        labels = torch.randint(3, img, (self.dec_len,), generator=g)
        n_pad = int(torch.randint(0, 3, (1,), generator=g))
        if n_pad:
            labels[-n_pad:] = -100
        return {
            "pixel_values": torch.randn(3, size, size, generator=g),
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
            "decoder_attention_mask": (labels != -100).long(),
        }


def loader_factory(config, batch_size: int, rest: int = 8):
    """``make_loader(stage, n_samples, seed)``: a seeded permutation of the stage's slice, no worker processes."""
    sizes: dict[int, int] = {}

    def make_loader(stage: int, n_samples: int | None, seed: int) -> DataLoader:
        n = rest if n_samples is None else n_samples
        sizes[stage] = n
        ds = SyntheticCaptions(config, n, offset=10_000 * stage)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        return DataLoader(torch.utils.data.Subset(ds, order), batch_size=batch_size, shuffle=False)

    return make_loader
