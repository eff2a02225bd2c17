"""Build the easy-VQA testbed: convert the data, train a small BLIP-2 FlanT5-style model from scratch on CPU,
evaluate it with the project's VQA evaluator and write everything to a cache directory.

    python benchmarks/testbed/build.py --seed 0 [--out DIR] [--minutes 30] [--threads 1]

Default DIR: $UKMP_TESTBED, else ${XDG_CACHE_HOME:-~/.cache}/ukmp/testbed. Then
``UKMP_TESTBED=DIR ukmp run benchmarks/testbed/testbed.yaml`` prunes, recovers and evaluates the trained model.

Training is a fixed schedule: ``--vision-epochs`` of stage-1 shape+colour pre-training of the ViT (a training-only
head; see :func:`pretrain_vision` for why), then ``--epochs`` of VQA training over the 4000 train images (with that
head's loss kept as an auxiliary term); ``--minutes`` is only a wall-clock cap.
Given the seed and the thread count the run is deterministic (seeded data order, fixed threads,
``torch.use_deterministic_algorithms``); a run stopped by the cap is marked ``"truncated": true`` in testbed.json.

Each step takes a batch of train images and ALL their questions: the ViT and Q-Former run once per image and the
query outputs are repeated for each question (``mm_encoder_outputs``), which is exact and ~10x cheaper. The T5
input is the evaluator's: ``num_query_tokens`` image tokens, then "Question: {q} Short answer:" (``blip_question``
cleaned, ``</s>`` appended); the target is the answer. One caption row per image is added as a prefix-LM sample
(``ukmp.data.batches.prefix_split``, as the recovery stage builds them), so calibration/recovery captions are text
the model knows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from ukmp.data.batches import prefix_split, sample_rng  # noqa: E402
from ukmp.data.images import ImageTransform  # noqa: E402
from ukmp.data.loaders import load_dataset  # noqa: E402
from ukmp.eval.text import VQA_PROMPT, blip_caption, blip_question  # noqa: E402
from ukmp.io import AtomicDir, atomic_write_json  # noqa: E402
from ukmp.models.build import build_model, build_processor, build_tokenizer  # noqa: E402
from ukmp.testbed import default_cache_dir, write_testbed_data  # noqa: E402

log = logging.getLogger("testbed")

IMAGE_SIZE = 64
NUM_QUERY_TOKENS = 8
# ViT 4 x 4 heads (MLP 512), Q-Former 2 layers, T5 2 + 2 layers x 4 heads (d_ff 256, gated-gelu, untied lm_head)
ARCH: dict[str, Any] = {
    "vision": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
               "patch_size": 8},
    "qformer": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4},
    "text": {"d_model": 96, "d_kv": 24, "d_ff": 256, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4},
}
TRAIN: dict[str, Any] = {"epochs": 4, "images_per_step": 16, "lr": 1e-3, "warmup_steps": 50, "weight_decay": 0.01,
                         "min_lr_ratio": 0.05, "grad_clip": 1.0, "caption_rows": True, "max_text_tokens": 64,
                         "dihedral": True, "shape_aux_weight": 1.0,
                         "vision_epochs": 24, "vision_images_per_step": 64, "vision_lr": 1e-3}
SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")


def model_config_dict(vocab_size: int, image_token_index: int, arch: dict[str, Any] = ARCH) -> dict[str, Any]:
    v, q, t = arch["vision"], arch["qformer"], arch["text"]
    return {
        "architectures": ["Blip2ForConditionalGeneration"], "model_type": "blip-2",
        "num_query_tokens": NUM_QUERY_TOKENS, "image_token_index": image_token_index,
        "image_text_hidden_size": 64, "initializer_factor": 1.0, "initializer_range": 0.02,
        "use_decoder_only_language_model": False,
        "vision_config": {"model_type": "blip_2_vision_model", "image_size": IMAGE_SIZE, "hidden_act": "gelu",
                          "layer_norm_eps": 1e-6, "attention_dropout": 0.0, "initializer_range": 0.02,
                          "qkv_bias": True, **v},
        "qformer_config": {"model_type": "blip_2_qformer", "vocab_size": 64, "hidden_act": "gelu",
                           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                           "max_position_embeddings": 64, "initializer_range": 0.02, "layer_norm_eps": 1e-12,
                           "pad_token_id": 0, "cross_attention_frequency": 1, "encoder_hidden_size": v["hidden_size"],
                           **q},
        "text_config": {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
                        "vocab_size": vocab_size, "relative_attention_num_buckets": 32,
                        "relative_attention_max_distance": 128, "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6,
                        "initializer_factor": 1.0, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": True,
                        "tie_word_embeddings": False, "decoder_start_token_id": 0, "pad_token_id": 0,
                        "eos_token_id": 1, "bos_token_id": 1, **t},
    }


def set_determinism(seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def canonical_tokenizer(tokenizer):
    """The same pieces in a canonical order (``canonical_unigram_vocab``): the Unigram trainer's order and last
    score digits vary from one process to the next, which would change token ids and so the whole training run."""
    from transformers import T5Tokenizer

    from ukmp.models.build import canonical_unigram_vocab

    vocab = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["vocab"]
    return T5Tokenizer(vocab=canonical_unigram_vocab(vocab), extra_ids=0)


def build_untrained(seed: int, corpus: list[str], arch: dict[str, Any] = ARCH):
    """(model, processor): tokenizer trained on ``corpus``, random weights from ``seed``."""
    from transformers import Blip2Config

    tokenizer = canonical_tokenizer(build_tokenizer(corpus, vocab_size=128))
    processor = build_processor(tokenizer, NUM_QUERY_TOKENS, IMAGE_SIZE)
    image_id = int(processor.tokenizer.convert_tokens_to_ids("<image>"))
    vocab = int(math.ceil((max(len(processor.tokenizer), image_id + 1)) / 8) * 8)
    cfg = Blip2Config.from_dict(model_config_dict(vocab, image_id, arch))
    model = build_model(cfg, seed=seed, attn_implementation="sdpa")
    lm = model.language_model
    if lm.lm_head.weight is lm.shared.weight:
        raise RuntimeError("lm_head is tied to the embeddings; the FlanT5 layout needs it untied")
    with torch.no_grad():
        # T5's unit-std lm_head gives initial logits of std ~sqrt(d_model): start near uniform instead
        lm.lm_head.weight.normal_(0.0, cfg.text_config.d_model ** -0.5)
        # transformers zero-initialises query_tokens: identical queries get identical gradients and never separate
        # (the Q-Former has no query position embedding), so the model would read the image through ONE query.
        # BLIP-2 itself draws them from N(0, 0.02).
        model.query_tokens.normal_(0.0, cfg.initializer_range)
    return model, processor


class Batches:
    """Per-image training rows: every question of an image (+ one caption prefix-LM row), tokenised once."""

    def __init__(self, vqa_ds, caption_ds, processor, seed: int, caption_rows: bool, max_text_tokens: int,
                 dihedral: bool = False):
        self.tok = processor.tokenizer
        self.dihedral = dihedral
        self.image_token_id = int(self.tok.convert_tokens_to_ids("<image>"))
        self.seed, self.caption_rows, self.max_tokens = seed, caption_rows, max_text_tokens
        images = sorted({r.image for r in vqa_ds.records})
        self.images = images
        index = {im: k for k, im in enumerate(images)}
        transform = ImageTransform(IMAGE_SIZE, train=False)
        first = {}
        for i, r in enumerate(vqa_ds.records):
            first.setdefault(r.image, i)
        self.pixels = torch.stack([transform(vqa_ds.open_image(first[im])) for im in images])
        self.rows: list[list[tuple[list[int], list[int]]]] = [[] for _ in images]
        for r in vqa_ds.records:
            prompt = VQA_PROMPT.format(blip_question(r.question))
            self.rows[index[r.image]].append((self._ids(prompt), self._ids(r.answers[0])))
        self.captions = {index[c.image]: blip_caption(c.caption) for c in caption_ds.records if c.image in index}
        # the shape and colour each image's answers state (-1: none does)
        self.shape = torch.full((len(images),), -1, dtype=torch.long)
        self.colour = torch.full((len(images),), -1, dtype=torch.long)
        for r in vqa_ds.records:
            words, ans = r.question.rstrip("?").split(), r.answers[0]
            positive = (ans == "yes") != ("not" in words or "no" in words)  # "is (there) (not|no) ...": yes / no
            for names, labels in ((SHAPES, self.shape), (COLOURS, self.colour)):
                named = [x for x in names if x in words]
                if ans in names:  # "what is the <colour> shape?", "what color is the shape?"
                    labels[index[r.image]] = names.index(ans)
                elif ans in ("yes", "no") and len(named) == 1 and positive:
                    labels[index[r.image]] = names.index(named[0])

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=True, truncation=True, max_length=self.max_tokens)["input_ids"])

    def __len__(self) -> int:
        return len(self.images)

    def order(self, epoch: int) -> list[int]:
        order = list(range(len(self.images)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def images_for(self, image_idx: list[int], epoch: int) -> torch.Tensor:
        """The batch's pixels; with ``dihedral``, each image turned by one of the 8 symmetries of the square
        (k quarter turns, then an optional mirror), drawn per image and epoch. Shape and colour answers are
        invariant under them, so the ViT sees 8x more distinct images without a label changing."""
        pixels = self.pixels[image_idx]
        if not self.dihedral:
            return pixels
        out = []
        for img, k in zip(pixels, image_idx):
            t = sample_rng(self.seed, k, epoch, stream=2).randrange(8)
            img = torch.rot90(img, t % 4, dims=(1, 2))
            out.append(img.flip(2) if t >= 4 else img)
        return torch.stack(out)

    def __call__(self, image_idx: list[int], epoch: int) -> dict[str, torch.Tensor]:
        enc, dec, owner = [], [], []
        for b, k in enumerate(image_idx):
            rows = list(self.rows[k])
            if self.caption_rows and k in self.captions:
                prefix, suffix = prefix_split(self.captions[k], sample_rng(self.seed, k, epoch, stream=1))
                rows.append((self._ids(prefix), self._ids(suffix)))
            for e, d in rows:
                enc.append([self.image_token_id] * NUM_QUERY_TOKENS + e)
                dec.append(d)
                owner.append(b)
        pad = int(self.tok.pad_token_id)
        le, ld = max(map(len, enc)), max(map(len, dec))
        input_ids = torch.full((len(enc), le), pad, dtype=torch.long)
        attention = torch.zeros((len(enc), le), dtype=torch.long)
        labels = torch.full((len(dec), ld), -100, dtype=torch.long)
        for r, (e, d) in enumerate(zip(enc, dec)):
            input_ids[r, : len(e)] = torch.tensor(e)
            attention[r, : len(e)] = 1
            labels[r, : len(d)] = torch.tensor(d)
        return {"pixel_values": self.images_for(image_idx, epoch), "owner": torch.tensor(owner),
                "shape": self.shape[image_idx], "colour": self.colour[image_idx], "input_ids": input_ids,
                "attention_mask": attention, "labels": labels, "decoder_attention_mask": (labels != -100).long()}


def shared_image_loss(model, batch: dict[str, torch.Tensor], aux_head: torch.nn.Module | None = None,
                      aux_weight: float = 0.0) -> torch.Tensor:
    """Cross-entropy of all rows, the image features computed once per image and repeated to its rows.

    With ``aux_head``: plus ``aux_weight`` x the cross-entropy of the training-only shape classifier of
    :func:`shape_logits` (see :func:`pretrain_vision`)."""
    feats = model.get_image_features(batch["pixel_values"], return_dict=True)
    aux = None
    if aux_head is not None and aux_weight > 0:
        aux = attribute_loss(aux_head, feats.last_hidden_state, batch["shape"], batch["colour"])
    feats.pooler_output = feats.pooler_output[batch["owner"]]
    out = model(pixel_values=None, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                labels=batch["labels"], decoder_attention_mask=batch["decoder_attention_mask"],
                mm_encoder_outputs={"image": feats})
    return out.loss if aux is None else out.loss + aux_weight * aux


def lr_at(step: int, total: int, train: dict[str, Any], key: str = "lr") -> float:
    if step < train["warmup_steps"]:
        return train[key] * (step + 1) / train["warmup_steps"]
    frac = (step - train["warmup_steps"]) / max(1, total - train["warmup_steps"])
    floor = train["min_lr_ratio"]
    return train[key] * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def new_shape_head(model, seed: int) -> torch.nn.Linear:
    """The training-only attribute classifier: a Linear on the mean of the ViT's output tokens giving shape and
    colour logits (never saved)."""
    gen = torch.Generator().manual_seed(seed + 1)
    head = torch.nn.Linear(model.config.vision_config.hidden_size, len(SHAPES) + len(COLOURS))
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02, generator=gen)
        head.bias.zero_()
    return head


def attribute_loss(head: torch.nn.Linear, tokens: torch.Tensor, shape: torch.Tensor,
                   colour: torch.Tensor) -> torch.Tensor:
    """Shape CE + colour CE of the head on the mean output token (unlabelled images ignored). Both together:
    a shape-only objective teaches the ViT to ignore colour, which the answers then cannot bring back."""
    logits = head(tokens.mean(dim=1))
    n = len(SHAPES)
    loss = logits.sum() * 0.0  # a batch without labels of one kind adds nothing (not NaN)
    for part, labels in ((logits[:, :n], shape), (logits[:, n:], colour)):
        if bool((labels >= 0).any()):
            loss = loss + torch.nn.functional.cross_entropy(part, labels, ignore_index=-1)
    return loss


def pretrain_vision(model, head: torch.nn.Linear, batches: Batches, train_cfg: dict[str, Any], seed: int,
                    deadline: float) -> dict[str, Any]:
    """Stage 1: the ViT alone learns to name each image's shape and colour (the head reads its mean output token).

    Trained on the answers alone, the ViT learns colour at once but leaves shape at chance for many epochs: the
    shape signal has to cross the ViT, the Q-Former and the T5, all freshly initialised. A direct objective first
    (as BLIP-2 trains its vision side in stages) costs ~10x less per image than a VQA step, which runs the T5 on
    every question of the image. Images are turned by a random symmetry of the square (``Batches.images_for``)."""
    labelled = [k for k in range(len(batches)) if int(batches.shape[k]) >= 0 or int(batches.colour[k]) >= 0]
    per_step = train_cfg["vision_images_per_step"]
    steps_per_epoch = math.ceil(len(labelled) / per_step)
    total = steps_per_epoch * train_cfg["vision_epochs"]
    params = list(model.vision_model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=train_cfg["vision_lr"], weight_decay=train_cfg["weight_decay"],
                            betas=(0.9, 0.98))
    model.train()
    step, losses, truncated = 0, [], False
    for epoch in range(train_cfg["vision_epochs"]):
        order = list(labelled)
        random.Random(seed * 1_000_003 + 7919 * (epoch + 1)).shuffle(order)
        for s in range(steps_per_epoch):
            if time.monotonic() > deadline:
                truncated = True
                break
            idx = order[s * per_step: (s + 1) * per_step]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, train_cfg, "vision_lr")
            pixels = batches.images_for(idx, 1000 + epoch)  # other draws than the VQA epochs
            tokens = model.vision_model(pixel_values=pixels).last_hidden_state
            loss = attribute_loss(head, tokens, batches.shape[idx], batches.colour[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, train_cfg["grad_clip"])
            opt.step()
            losses.append(loss.item())
            step += 1
        if losses:
            log.info("vision epoch %d step %d/%d shape+colour loss %.4f", epoch, step, total,
                     sum(losses[-steps_per_epoch:]) / len(losses[-steps_per_epoch:]))
        if truncated:
            log.warning("--minutes budget reached in vision pre-training after %d of %d steps", step, total)
            break
    return {"steps": step, "planned_steps": total, "truncated": truncated, "labelled_images": len(labelled),
            "loss_per_epoch": [round(sum(losses[i:i + steps_per_epoch]) / len(losses[i:i + steps_per_epoch]), 5)
                               for i in range(0, len(losses), steps_per_epoch)]}


def train(model, batches: Batches, train_cfg: dict[str, Any], seed: int, deadline: float,
          aux_head: torch.nn.Linear | None = None) -> dict[str, Any]:
    steps_per_epoch = math.ceil(len(batches) / train_cfg["images_per_step"])
    total = steps_per_epoch * train_cfg["epochs"]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "query_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "query_tokens" not in n)]
    aux_weight = float(train_cfg.get("shape_aux_weight", 0.0)) if aux_head is not None else 0.0
    if aux_weight > 0:
        decay += [aux_head.weight]
        no_decay += [aux_head.bias]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": train_cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=train_cfg["lr"], betas=(0.9, 0.98))
    model.train()
    step, losses, truncated = 0, [], False
    for epoch in range(train_cfg["epochs"]):
        order = batches.order(epoch)
        for s in range(steps_per_epoch):
            if time.monotonic() > deadline:
                truncated = True
                break
            idx = order[s * train_cfg["images_per_step"]: (s + 1) * train_cfg["images_per_step"]]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, train_cfg)
            loss = shared_image_loss(model, batches(idx, epoch), aux_head, aux_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg["grad_clip"])
            opt.step()
            losses.append(loss.item())
            step += 1
            if step % 25 == 0 or step == total:
                log.info("epoch %d step %d/%d loss %.4f lr %.2e", epoch, step, total,
                         sum(losses[-25:]) / len(losses[-25:]), opt.param_groups[0]["lr"])
        if truncated:
            log.warning("--minutes budget reached after %d of %d steps: training stopped early", step, total)
            break
    model.eval()
    return {"steps": step, "planned_steps": total, "truncated": truncated, "final_loss": losses[-1] if losses else None,
            "loss_every_25": [round(sum(losses[i:i + 25]) / len(losses[i:i + 25]), 5)
                              for i in range(0, len(losses), 25)]}


def evaluate(model_dir: Path, yaml: str, batch_size: int, num_beams: int, max_samples: int) -> dict[str, Any]:
    """VQA accuracy of the SAVED model (reloaded as ``model.source`` would be) with the project's evaluator."""
    from ukmp.config import ModelConfig
    from ukmp.eval.evaluators import evaluate_vqa
    from ukmp.runtime import load_dense

    model, processor = load_dense(ModelConfig(source=str(model_dir), device="cpu"))
    ds = load_dataset(yaml, **({"max_samples": max_samples} if max_samples else {}))
    metrics, preds = evaluate_vqa(model, processor, ds, kind="vqa", image_size=IMAGE_SIZE, batch_size=batch_size,
                                  num_beams=num_beams, min_new_tokens=0, progress=False)
    return {**metrics, "num_beams": num_beams, "predictions": preds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="cache directory (default: $UKMP_TESTBED or XDG cache)")
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-clock cap on training (default 30)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (results depend on it; default 1: fastest on a shared 2-core machine)")
    ap.add_argument("--epochs", type=int, default=TRAIN["epochs"])
    ap.add_argument("--lr", type=float, default=TRAIN["lr"])
    ap.add_argument("--images-per-step", type=int, default=TRAIN["images_per_step"])
    ap.add_argument("--patch-size", type=int, default=ARCH["vision"]["patch_size"])
    ap.add_argument("--no-dihedral", dest="dihedral", action="store_false",
                    help="train without the random rotations/mirrors of the images (on by default)")
    ap.add_argument("--shape-aux-weight", type=float, default=TRAIN["shape_aux_weight"],
                    help="weight of the training-only shape classifier on the Q-Former output (0: off)")
    ap.add_argument("--vision-epochs", type=int, default=TRAIN["vision_epochs"],
                    help="epochs of stage-1 shape pre-training of the ViT (0: off)")
    ap.add_argument("--eval-beams", type=int, default=1)
    ap.add_argument("--eval-max-samples", type=int, default=0, help="0: the whole test set")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    t0 = time.monotonic()
    out = (args.out or default_cache_dir()).expanduser().resolve()
    set_determinism(args.seed, args.threads)

    data = write_testbed_data(out)
    log.info("data: %s", data["counts"])
    vqa_train = load_dataset(data["configs"]["vqa_train"])
    captions = load_dataset(data["configs"]["cc595k"])
    corpus = sorted({VQA_PROMPT.format(blip_question(r.question)) for r in vqa_train.records}
                    | {a for r in vqa_train.records for a in r.answers}
                    | {blip_caption(c.caption) for c in captions.records})
    arch = {**ARCH, "vision": {**ARCH["vision"], "patch_size": args.patch_size}}
    model, processor = build_untrained(args.seed, corpus, arch)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %d parameters, vocab %d", n_params, model.config.text_config.vocab_size)
    train_cfg = {**TRAIN, "epochs": args.epochs, "lr": args.lr, "images_per_step": args.images_per_step,
                 "dihedral": args.dihedral, "shape_aux_weight": args.shape_aux_weight,
                 "vision_epochs": args.vision_epochs}
    batches = Batches(vqa_train, captions, processor, args.seed, train_cfg["caption_rows"], train_cfg["max_text_tokens"],
                      train_cfg["dihedral"])
    t_train = time.monotonic()
    head = new_shape_head(model, args.seed)
    vision_info = pretrain_vision(model, head, batches, train_cfg, args.seed, deadline=t0 + 60 * args.minutes)
    log.info("vision pre-training: %d steps, %.1f min", vision_info["steps"], (time.monotonic() - t_train) / 60)
    info = train(model, batches, train_cfg, args.seed, deadline=t0 + 60 * args.minutes, aux_head=head)
    info["vision_pretraining"] = vision_info
    info["truncated"] = info["truncated"] or vision_info["truncated"]
    train_minutes = (time.monotonic() - t_train) / 60

    model_dir = out / "model"
    with AtomicDir(model_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    ev = evaluate(model_dir, data["configs"]["okvqa"], 128, args.eval_beams, args.eval_max_samples)
    atomic_write_json(out / "test_predictions.json", ev.pop("predictions"))
    report = {
        "accuracy": round(ev["accuracy"], 4), "count": ev["count"], "num_beams": ev["num_beams"],
        "seed": args.seed, "threads": args.threads, "minutes_budget": args.minutes,
        "train_minutes": round(train_minutes, 2), "total_minutes": round((time.monotonic() - t0) / 60, 2),
        "parameters": n_params, "train": {**train_cfg, **info}, "arch": arch,
        "model_config": json.loads((model_dir / "config.json").read_text()),
        "data": data, "model_dir": str(model_dir), "torch": torch.__version__,
        "tokenizer_sha256": hashlib.sha256((model_dir / "tokenizer.json").read_bytes()).hexdigest(),
        "weights_sha256": hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest(),
    }
    atomic_write_json(out / "testbed.json", report)
    log.info("accuracy %.2f%% on %d test questions; %.1f min training, %.1f min total -> %s",
             ev["accuracy"], ev["count"], train_minutes, report["total_minutes"], out / "testbed.json")
    if report["train"]["truncated"]:
        log.warning("training was truncated by --minutes; the result is not reproducible")
    return 0


if __name__ == "__main__":
    sys.exit(main())
