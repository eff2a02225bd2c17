"""LLaVA-style training of the testbed's LLaVA on easy-VQA, the vision tower frozen (its features cached once).

Rows are ukmp's own evaluator prompts (``ukmp.data.prompts.PromptIds`` with the model's batch layout and the
processor's chat template, on ``vqa_prompt(question)``) followed by the answer and ``<|im_end|>``. Every row of
that template starts with the same ids up to the last image token (``<|im_start|>user\\n`` + 64 image tokens), so
an image's prefix runs through the language model once and its questions continue from its key/value cache
(copied per question row; the gradient flows back through the cache into the projector). ``check_forward``
compares that with the stock model's forward on whole rows from pixels.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from build import accuracy_table, question_kind


class Rows:
    """Question rows grouped by image: ``prefix`` (shared ids, ending with the image tokens), per row the
    continuation ids, the label span inside it and the ``question_kind``."""

    def __init__(self, dataset, processor, layout):
        from ukmp.data.prompts import PromptIds
        from ukmp.eval.text import vqa_prompt

        tok = processor.tokenizer
        build = PromptIds(processor, layout, "template")
        image_id = int(layout.image_token_id)
        self.images = sorted({r.image for r in dataset.records})
        index = {im: k for k, im in enumerate(self.images)}
        first: dict[str, int] = {}
        self.by_image: list[list[tuple[list[int], tuple[int, int], str]]] = [[] for _ in self.images]
        self.prefix: list[int] | None = None
        for i, r in enumerate(dataset.records):
            first.setdefault(r.image, i)
            ids = build(vqa_prompt(r.question))
            cut = max(j for j, t in enumerate(ids) if t == image_id) + 1
            if self.prefix is None:
                self.prefix = ids[:cut]
            elif ids[:cut] != self.prefix:
                raise RuntimeError(f"{r.question!r}: its prompt does not start with the shared prefix")
            answer = list(tok(r.answers[0], add_special_tokens=False)["input_ids"]) + [int(tok.eos_token_id)]
            rest = ids[cut:]
            self.by_image[index[r.image]].append((rest + answer, (len(rest), len(rest) + len(answer)),
                                                  question_kind(r.question, r.answers[0])))
        self.first = [first[im] for im in self.images]
        self.image_at = self.prefix.index(image_id)
        self.pad = int(tok.pad_token_id)

    def full_ids(self, k: int, q: int) -> list[int]:
        """The whole row (prompt + answer + end), as the evaluator's prompt ids followed by the target."""
        return self.prefix + self.by_image[k][q][0]

    def batch(self, picks: list[tuple[int, int]]) -> dict[str, Any]:
        slots: dict[int, int] = {}
        rows, spans, owner, kinds = [], [], [], []
        for k, q in picks:
            ids, span, kind = self.by_image[k][q]
            rows.append(ids)
            spans.append(span)
            owner.append(slots.setdefault(k, len(slots)))
            kinds.append(kind)
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), self.pad)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        labels = torch.full((len(rows), n), -100)
        for i, (r, (a, b)) in enumerate(zip(rows, spans)):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
            labels[i, a - 1: b - 1] = torch.tensor(r[a:b])  # position t predicts token t + 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "owner": torch.tensor(owner),
                "images": torch.tensor(list(slots)), "kinds": kinds}


def row_logits(model, rows: Rows, batch: dict[str, Any], feats: torch.Tensor):
    """(logits at the labelled positions, labels): each image's prefix once, its rows from its cache. The label at
    a continuation position t predicts token t + 1; the last prefix position predicts the continuation's first token
    (never a label here: continuations start with prompt text)."""
    lm = model.model.language_model
    img = model.model.multi_modal_projector(feats)
    emb = lm.embed_tokens(torch.tensor(rows.prefix))
    head = emb[: rows.image_at].unsqueeze(0).expand(img.shape[0], -1, -1)
    prefix = torch.cat([head, img.to(head.dtype), emb[rows.image_at + img.shape[1]:].unsqueeze(0).expand(
        img.shape[0], -1, -1)], 1)
    cache = lm(inputs_embeds=prefix, use_cache=True).past_key_values
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, batch["owner"])
        layer.values = layer.values.index_select(0, batch["owner"])
    p = prefix.shape[1]
    mask = torch.cat([torch.ones(batch["input_ids"].shape[0], p, dtype=torch.long), batch["attention_mask"]], 1)
    h = lm(input_ids=batch["input_ids"], attention_mask=mask, past_key_values=cache, use_cache=True).last_hidden_state
    sel = batch["labels"] != -100
    return model.lm_head(h[sel]), batch["labels"][sel]


def check_forward(model, rows: Rows, feats: torch.Tensor, pixels: torch.Tensor,
                  picks: list[tuple[int, int]]) -> float:
    """Max abs difference at the labelled positions between :func:`row_logits` (cached features, shared prefix)
    and the stock forward on whole right-padded rows from ``pixels`` (one per row's image)."""
    batch = rows.batch(picks)
    full = [rows.full_ids(k, q) for k, q in picks]
    n = max(map(len, full))
    ids = torch.full((len(full), n), rows.pad)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(full):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    with torch.no_grad():
        ours, _ = row_logits(model, rows, batch, feats[batch["images"]])
        out = model(pixel_values=pixels[batch["images"]][batch["owner"]], input_ids=ids, attention_mask=mask).logits
    p = len(rows.prefix)
    sel = batch["labels"] != -100
    theirs = out[:, p:][sel]
    return float((ours - theirs).abs().max())


def accuracy(model, rows: Rows, feats: torch.Tensor, picks: list[tuple[int, int]], batch_size: int = 50) -> dict:
    """Teacher-forced exact match per ``question_kind``: every answer token and the end token are the argmax,
    i.e. greedy decoding returns exactly the answer."""
    hits: dict[str, list[bool]] = {}
    with torch.no_grad():
        for s in range(0, len(picks), batch_size):
            batch = rows.batch(picks[s: s + batch_size])
            logits, labels = row_logits(model, rows, batch, feats[batch["images"]])
            ok = torch.ones(batch["labels"].shape[0], dtype=torch.bool)
            where = (batch["labels"] != -100).nonzero()[:, 0]
            ok[where[logits.argmax(-1) != labels]] = False
            for kind, good in zip(batch["kinds"], ok.tolist()):
                hits.setdefault(kind, []).append(good)
    return accuracy_table(hits)


def lr_at(step: int, total: int, base: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def picks_of(rows: Rows, take: list[int], per_image: int, present_weight: float, seed: int, step: int):
    """``per_image`` questions of each image in ``take``; "yes/no: present" ones weigh ``present_weight`` in a
    weighted draw without replacement (key u ** (1 / weight), the largest win)."""
    out = []
    for k in take:
        rng = random.Random((seed * 1_000_003 + k) * 7919 + step)
        w = [present_weight if kind == "yes/no: present" else 1.0 for _, _, kind in rows.by_image[k]]
        qs = sorted(range(len(w)), key=lambda q: rng.random() ** (1 / w[q]), reverse=True)
        out += [(k, q) for q in qs[:per_image]]
    return out


def run_stage(model, rows: Rows, feats: torch.Tensor, params: list[torch.nn.Parameter], cfg: dict[str, Any],
              seed: int, offset: int, deadline: float, log, curve_eval) -> dict[str, Any]:
    """``cfg["steps"]`` AdamW steps (cosine, warmup) on ``cfg["images"]`` images x ``cfg["questions"]`` questions;
    images in seeded epoch orders (``offset``: the steps already taken, so stages continue the order)."""
    import time

    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg["weight_decay"]},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=(0.9, 0.98))
    order: list[int] = []
    epoch = 0
    while len(order) < (offset + cfg["steps"]) * cfg["images"]:
        e = list(range(len(rows.images)))
        random.Random(seed * 1_000_003 + epoch).shuffle(e)
        order += e
        epoch += 1
    losses, curve, t0, eval_s, truncated = [], [], time.monotonic(), 0.0, False
    model.train()
    for step in range(cfg["steps"]):
        if time.monotonic() > deadline:
            truncated = True
            break
        g = offset + step
        picks = picks_of(rows, order[g * cfg["images"]: (g + 1) * cfg["images"]], cfg["questions"],
                         cfg["present_weight"], seed, g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg["steps"], cfg["lr"], cfg["warmup"])
        batch = rows.batch(picks)
        logits, labels = row_logits(model, rows, batch, feats[batch["images"]])
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 10 == 0:
            log.info("step %d/%d loss %.4f (%.1f min)", step + 1, cfg["steps"], sum(losses[-10:]) / 10,
                     (time.monotonic() - t0) / 60)
        if curve_eval and ((step + 1) % cfg["eval_every"] == 0 or step + 1 == cfg["steps"]):
            te = time.monotonic()
            model.eval()
            point = {"step": g + 1, "train_minutes": round((te - t0 - eval_s) / 60, 2), **curve_eval()}
            model.train()
            eval_s += time.monotonic() - te
            curve.append(point)
            log.info("curve: %s", point)
    model.eval()
    return {"steps": len(losses), "planned_steps": cfg["steps"], "truncated": truncated,
            "loss_every_10": [round(sum(losses[i:i + 10]) / len(losses[i:i + 10]), 4)
                              for i in range(0, len(losses), 10)],
            "curve": curve, "train_minutes": round((time.monotonic() - t0 - eval_s) / 60, 2),
            "curve_eval_minutes": round(eval_s / 60, 2)}
