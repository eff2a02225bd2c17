"""Build the real-weights testbed: a BLIP-2 made of a real pretrained ViT (DINOv2 ViT-S/14) and a real pretrained
LLM (SmolLM2-135M-Instruct), its Q-Former trained on easy-VQA, and calibration / recovery data it never saw.

    make realparts-install                       # once: the optional extra (see assets.py)
    python benchmarks/realparts/build.py [--seed 0] [--out DIR] [--steps 450] [--minutes 60] [--train-vit last-block]

Steps (each writes under DIR = $UKMP_REALPARTS or ~/.cache/ukmp/realparts; the trained model goes to DIR/model):

1. ViT: the ONNX backbone converted exactly (``convert.py``), checked against onnxruntime at 224 px.
2. LLM: SmolLM2-135M-Instruct from its Q4_1 GGUF (dequantised to float32 by transformers' GGUF reader).
3. BLIP-2: both in one ``Blip2ForConditionalGeneration`` (``<image>`` added to the tokenizer, embeddings resized by
   one zero row); its language model's perplexity on the held-out text must equal the standalone model's.
4. Training, as BLIP-2's second stage: only the Q-Former, the query tokens and the projection learn (with
   ``--train-vit last-block`` also the ViT's last block and final LayerNorm; ``layernorm``: every ViT LayerNorm);
   the frozen part of the ViT runs once per image (features cached in memory). Each step takes ``--images``
   train images and ``--questions`` of each one's questions, in the evaluator's own prompt format
   (``[image tokens] "Question: {q} Short answer:" " {answer}" eos``). Deterministic given seed and threads.
5. Data the model was not trained on: captions of the train images in several wordings (calibration / recovery),
   the held-out and calibration text (``assets.write_text_data``), the fixed 500 test questions.
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
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import assets  # noqa: E402
import convert  # noqa: E402

log = logging.getLogger("realparts")

IMAGE_SIZE = 112  # 8 x 8 patches of 14 px; easy-VQA images are 64 px
NUM_QUERY_TOKENS = 8
QFORMER = {"hidden_size": 384, "num_hidden_layers": 2, "num_attention_heads": 6, "intermediate_size": 1536}
TRAIN = {"steps": 450, "images": 8, "questions": 4, "lr": 5e-4, "vit_lr": 1e-4, "warmup": 30, "min_lr_ratio": 0.1,
         "weight_decay": 0.01, "grad_clip": 1.0, "eval_every": 100, "curve_questions": 300}
BENCH_QUESTIONS = 500
CAPTION_TEMPLATES = (
    "a photo of a {colour} {shape}",
    "there is a {colour} {shape} in the picture",
    "the image shows a {shape} that is {colour}",
    "a simple drawing of a {colour} {shape} on a plain background",
    "one {colour} {shape}, centred on white",
    "a {shape} painted {colour}",
)


def question_type(answer: str) -> str:
    from ukmp.testbed import SHAPES, YES_NO

    return "yes/no" if answer in YES_NO else "shape" if answer in SHAPES else "colour"


def question_kind(question: str, answer: str) -> str:
    """``question_type``, with yes/no questions split by what the image holds: "yes/no: present" when the colour or
    shape asked about is in it ("is there a red shape?" yes; "is there not a red shape?" no), "yes/no: absent"
    otherwise. easy-VQA asks mostly about absent things (82 % of its yes/no questions, train and test alike), so a
    model that never looks at the image answers the absent ones from the wording alone: "is there a ...?" no, "is
    there not a ...?" yes. Only the present ones show whether it compares the question with the image."""
    kind = question_type(answer)
    if kind != "yes/no":
        return kind
    q = f" {question.lower().strip()} "
    negated = " not " in q or q.startswith(" is no ")
    return "yes/no: present" if negated == (answer == "no") else "yes/no: absent"


# --------------------------------------------------------------------------------------------------- assembly
def load_llm(dtype: str = "float32"):
    """(SmolLM2 causal LM, its tokenizer) from the packaged GGUF."""
    from transformers import AutoTokenizer

    from ukmp.models.build import load_model

    path = assets.gguf_path()
    lm = load_model(str(path.parent), gguf_file=path.name, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return lm, tok


def assemble(vit_sd: dict[str, torch.Tensor], vit_cfg: dict[str, Any], lm, tokenizer, seed: int):
    """(model, processor): BLIP-2 with the converted ViT, a fresh Q-Former (seeded) and the LLM."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from ukmp.models.build import build_processor

    processor = build_processor(tokenizer, NUM_QUERY_TOKENS, IMAGE_SIZE)
    image_id = int(processor.tokenizer.convert_tokens_to_ids("<image>"))
    vocab = len(processor.tokenizer)
    if image_id != vocab - 1 or vocab != lm.config.vocab_size + 1:
        raise RuntimeError(f"<image>: expected one new token after the LLM's {lm.config.vocab_size}, got id {image_id}")
    text = {k: v for k, v in lm.config.to_dict().items()
            if k not in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                         "architectures", "dtype")}
    text["vocab_size"] = vocab
    qformer = {"model_type": "blip_2_qformer", "vocab_size": 64, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
               "attention_probs_dropout_prob": 0.0, "max_position_embeddings": 64, "initializer_range": 0.02,
               "layer_norm_eps": 1e-12, "pad_token_id": 0, "cross_attention_frequency": 1,
               "encoder_hidden_size": vit_cfg["hidden_size"], **QFORMER}
    cfg = Blip2Config(vision_config={k: v for k, v in vit_cfg.items() if k != "model_type"},
                      qformer_config=qformer, text_config=text, num_query_tokens=NUM_QUERY_TOKENS,
                      image_token_index=image_id, use_decoder_only_language_model=True,
                      image_text_hidden_size=256, initializer_range=0.02)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(cfg)
    model.vision_model.load_state_dict(vit_sd, strict=True)
    emb = lm.get_input_embeddings().weight.detach()
    lm_sd = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    lm_sd["model.embed_tokens.weight"] = torch.cat([emb, torch.zeros(1, emb.shape[1], dtype=emb.dtype)], 0)
    missing, unexpected = model.language_model.load_state_dict(lm_sd, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"language model weights: missing {missing}, unexpected {unexpected}")
    lmm = model.language_model
    if lmm.lm_head.weight is not lmm.model.embed_tokens.weight:
        raise RuntimeError("SmolLM2 ties lm_head to the embeddings; the BLIP-2 copy must too")
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed))  # BLIP-2's N(0, 0.02)
    return model.eval(), processor


def perplexity(model, tokenizer, yaml: str, max_windows: int | None = None) -> dict[str, float]:
    from ukmp.data.loaders import load_dataset
    from ukmp.eval.perplexity import evaluate_perplexity

    ds = load_dataset(yaml, **({"max_samples": max_windows} if max_windows else {}))
    metrics, _ = evaluate_perplexity(model, tokenizer, ds, batch_size=4, progress=False)
    return metrics


# --------------------------------------------------------------------------------------------------- data
def write_captions(root: Path, data: dict[str, Any], seed: int) -> str:
    """Calibration / recovery captions: every train image whose colour and shape are known, one caption in one of
    :data:`CAPTION_TEMPLATES` (drawn per image from ``seed``); the cc595k format the loaders read."""
    from ukmp.io import atomic_write_json
    from ukmp.testbed import dataset_yaml

    meta = json.loads((root / "cc595k" / "metadata.json").read_text())
    out = []
    for k, m in enumerate(meta):
        if not (m["colour"] and m["shape"]):
            continue
        t = random.Random(seed * 7919 + k).randrange(len(CAPTION_TEMPLATES))
        text = CAPTION_TEMPLATES[t].format(colour=m["colour"], shape=m["shape"])
        out.append({**m, "caption": text, "blip_caption": text, "template": t})
    atomic_write_json(root / "captions" / "metadata.json", out)
    path = dataset_yaml(root / "configs" / "captions.yaml", root, "cc595k", "captions/metadata.json", "train")
    return str(path)


def write_bench_questions(root: Path, n: int = BENCH_QUESTIONS) -> str:
    """The fixed benchmark questions: the first ``n`` of the (seeded, shuffled) test file."""
    from ukmp.io import atomic_write_json
    from ukmp.testbed import dataset_yaml

    recs = json.loads((root / "vqa" / "test.json").read_text())[:n]
    atomic_write_json(root / "vqa" / f"test{n}.json", recs)
    return str(dataset_yaml(root / "configs" / f"vqa_test{n}.yaml", root, "okvqa", f"vqa/test{n}.json", "test"))


# --------------------------------------------------------------------------------------------------- training
class Rows:
    """Question rows in the evaluator's decoder-only format, tokenised once, grouped by image."""

    def __init__(self, dataset, tokenizer, image_token_id: int):
        from ukmp.data.batches import prompt_ids
        from ukmp.eval.text import VQA_PROMPT, blip_question

        self.images = sorted({r.image for r in dataset.records})
        index = {im: k for k, im in enumerate(self.images)}
        first: dict[str, int] = {}
        self.by_image: list[list[tuple[list[int], list[int], str]]] = [[] for _ in self.images]
        for i, r in enumerate(dataset.records):
            first.setdefault(r.image, i)
            head = [image_token_id] * NUM_QUERY_TOKENS + prompt_ids(tokenizer, VQA_PROMPT.format(blip_question(r.question)))
            tail = list(tokenizer(" " + r.answers[0], add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
            self.by_image[index[r.image]].append((head, tail, question_kind(r.question, r.answers[0])))
        self.first = [first[im] for im in self.images]
        self.pad = int(tokenizer.pad_token_id)

    def batch(self, picks: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """``picks``: (image index, question index) pairs; ``owner`` maps each row to its image's batch slot."""
        from ukmp.data.batches import aligned_batch

        slots: dict[int, int] = {}
        rows, spans, owner, kinds = [], [], [], []
        for k, q in picks:
            head, tail, kind = self.by_image[k][q]
            rows.append(head + tail)
            spans.append((len(head), len(head) + len(tail)))
            owner.append(slots.setdefault(k, len(slots)))
            kinds.append(kind)
        out = aligned_batch(rows, spans, self.pad)
        out["owner"] = torch.tensor(owner)
        out["images"] = torch.tensor(list(slots))
        out["kinds"] = kinds
        return out


def vision_features(model, pixels: torch.Tensor, cut: int, batch: int = 64) -> torch.Tensor:
    """The ViT's hidden states entering layer ``cut`` (``cut == num layers``: the final output, post-LayerNorm)."""
    vm = model.vision_model
    out = []
    with torch.no_grad():
        for b in range(0, len(pixels), batch):
            h = vm.embeddings(pixels[b: b + batch])
            for layer in vm.encoder.layers[:cut]:
                h = layer_out(layer(h))
            if cut == len(vm.encoder.layers):
                h = vm.post_layernorm(h)
            out.append(h)
    return torch.cat(out)


def layer_out(x):
    return x[0] if isinstance(x, tuple) else x


def image_tokens(model, feats: torch.Tensor, cut: int) -> torch.Tensor:
    """Projected query outputs ``[B, num_query_tokens, D_lm]`` from cached features entering ViT layer ``cut``."""
    vm = model.vision_model
    h = feats
    if cut < len(vm.encoder.layers):
        for layer in vm.encoder.layers[cut:]:
            h = layer_out(layer(h))
        h = vm.post_layernorm(h)
    q = model.qformer(query_embeds=model.query_tokens.expand(h.shape[0], -1, -1), encoder_hidden_states=h,
                      encoder_attention_mask=torch.ones(h.shape[:2], dtype=torch.long), return_dict=True)
    return model.language_projection(q.last_hidden_state)


def row_logits(model, batch: dict[str, Any], tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at the labelled positions, their labels): the LM on the rows, image tokens replaced by ``tokens``
    of each row's image. Only labelled positions go through ``lm_head`` (a quarter of the model's FLOPs here)."""
    lm = model.language_model
    ids = batch["input_ids"]
    emb = lm.get_input_embeddings()(ids)
    img = ids == model.config.image_token_index
    per_row = tokens[batch["owner"]]
    emb = emb.masked_scatter(img.unsqueeze(-1), per_row.to(emb.dtype))
    h = lm.model(inputs_embeds=emb, attention_mask=batch["attention_mask"]).last_hidden_state
    sel = batch["labels"] != -100
    return lm.lm_head(h[sel]), batch["labels"][sel]


def correct_rows(logits: torch.Tensor, labels: torch.Tensor, batch: dict[str, Any]) -> list[bool]:
    """Per row: every target token (answer + eos) is the argmax given the previous ones, i.e. greedy decoding
    returns exactly the answer (the evaluator's exact match)."""
    sel = batch["labels"] != -100
    ok = torch.ones(sel.shape[0], dtype=torch.bool)
    rows = sel.nonzero()[:, 0]
    wrong = rows[logits.argmax(-1) != labels]
    ok[wrong] = False
    return ok.tolist()


def lr_at(step: int, total: int, base: float, cfg: dict[str, Any]) -> float:
    if step < cfg["warmup"]:
        return base * (step + 1) / cfg["warmup"]
    frac = min(1.0, (step - cfg["warmup"]) / max(1, total - cfg["warmup"]))
    return base * (cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * frac)))


def trainable(model, train_vit: str) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter], int]:
    """(Q-Former side params, ViT params, the ViT layer the cached features enter)."""
    for p in model.parameters():
        p.requires_grad_(False)
    side = [model.query_tokens, *model.qformer.parameters(), *model.language_projection.parameters()]
    vm = model.vision_model
    n = len(vm.encoder.layers)
    vit: list[torch.nn.Parameter] = []
    cut = n
    if train_vit == "last-block":
        cut = n - 1
        vit = [*vm.encoder.layers[-1].parameters(), *vm.post_layernorm.parameters()]
    elif train_vit == "layernorm":
        cut = 0
        vit = [p for name, p in vm.named_parameters() if "layer_norm" in name or "post_layernorm" in name]
    elif train_vit != "none":
        raise ValueError(f"--train-vit: choose none, layernorm or last-block, got {train_vit!r}")
    for p in side + vit:
        p.requires_grad_(True)
    return side, vit, cut


def accuracy(model, rows: Rows, feats: torch.Tensor, cut: int, picks: list[tuple[int, int]],
             batch_size: int = 50) -> dict[str, Any]:
    hits: dict[str, list[bool]] = {}
    with torch.no_grad():
        for b in range(0, len(picks), batch_size):
            batch = rows.batch(picks[b: b + batch_size])
            logits, labels = row_logits(model, batch, image_tokens(model, feats[batch["images"]], cut))
            for kind, ok in zip(batch["kinds"], correct_rows(logits, labels, batch)):
                hits.setdefault(kind, []).append(ok)
    return accuracy_table(hits)


def accuracy_table(hits: dict[str, list[float]]) -> dict[str, Any]:
    """{overall %, questions, by_type: % per ``question_type`` and per ``question_kind``} from per-kind hits (each a
    question's score in [0, 1])."""
    every = [x for v in hits.values() for x in v]
    by_type: dict[str, list[float]] = {}
    for kind, v in hits.items():
        by_type.setdefault(kind.split(":")[0], []).extend(v)
        if ":" in kind:
            by_type[kind] = v
        else:  # colour and shape: the open questions
            by_type.setdefault("open", []).extend(v)
    return {"accuracy": round(100 * sum(every) / len(every), 2), "questions": len(every),
            "by_type": {k: round(100 * sum(v) / len(v), 2) for k, v in sorted(by_type.items())}}


def draw_questions(rows: Rows, k: int, n: int, present_weight: float, rng: random.Random) -> list[int]:
    """``n`` of image ``k``'s question indices: a shuffle, or (``present_weight`` != 1) a weighted draw without
    replacement in which the "yes/no: present" questions weigh ``present_weight`` (key u ** (1 / weight), the
    largest keys win)."""
    qs = list(range(len(rows.by_image[k])))
    if present_weight == 1.0:
        rng.shuffle(qs)
    else:
        w = [present_weight if kind == "yes/no: present" else 1.0 for _, _, kind in rows.by_image[k]]
        qs.sort(key=lambda q: rng.random() ** (1 / w[q]), reverse=True)
    return qs[:n]


def train_step(model, rows: Rows, feats: torch.Tensor, cut: int, picks: list[tuple[int, int]], opt, params,
               grad_clip: float) -> float:
    """One optimiser step on the rows ``picks`` (cross-entropy on the answer tokens); the loss."""
    batch = rows.batch(picks)
    logits, labels = row_logits(model, batch, image_tokens(model, feats[batch["images"]], cut))
    loss = torch.nn.functional.cross_entropy(logits, labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    return loss.item()


def train(model, rows: Rows, feats: torch.Tensor, cut: int, side, vit, cfg: dict[str, Any], seed: int,
          deadline: float, curve_eval) -> dict[str, Any]:
    groups = [{"params": [p for p in side if p.ndim >= 2 and p is not model.query_tokens], "lr": cfg["lr"],
               "weight_decay": cfg["weight_decay"], "base": cfg["lr"]},
              {"params": [p for p in side if p.ndim < 2 or p is model.query_tokens], "lr": cfg["lr"],
               "weight_decay": 0.0, "base": cfg["lr"]}]
    if vit:
        groups.append({"params": vit, "lr": cfg["vit_lr"], "weight_decay": 0.0, "base": cfg["vit_lr"]})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98))
    params = [p for g in groups for p in g["params"]]
    n_img, steps = len(rows.images), cfg["steps"]
    order: list[int] = []
    losses, curve, truncated, t0 = [], [], False, time.monotonic()
    model.train()
    step = 0
    for step in range(steps):
        if time.monotonic() > deadline:
            truncated = True
            break
        if len(order) < cfg["images"]:
            epoch_order = list(range(n_img))
            random.Random(seed * 1_000_003 + step).shuffle(epoch_order)
            order += epoch_order
        take, order = order[: cfg["images"]], order[cfg["images"]:]
        picks = [(k, q) for k in take
                 for q in draw_questions(rows, k, cfg["questions"], cfg.get("present_weight", 1.0),
                                         random.Random((seed * 1_000_003 + k) * 7919 + step))]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, g["base"], cfg)
        losses.append(train_step(model, rows, feats, cut, picks, opt, params, cfg["grad_clip"]))
        if (step + 1) % 25 == 0:
            log.info("step %d/%d loss %.4f (%.1f min)", step + 1, steps, sum(losses[-25:]) / 25,
                     (time.monotonic() - t0) / 60)
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == steps:
            model.eval()
            point = {"step": step + 1, "minutes": round((time.monotonic() - t0) / 60, 2), **curve_eval()}
            model.train()
            curve.append(point)
            log.info("curve: %s", point)
    model.eval()
    return {"steps": len(losses), "planned_steps": steps, "truncated": truncated,
            "loss_every_25": [round(sum(losses[i:i + 25]) / len(losses[i:i + 25]), 4)
                              for i in range(0, len(losses), 25)],
            "curve": curve, "train_minutes": round((time.monotonic() - t0) / 60, 2)}


# --------------------------------------------------------------------------------------------------- main
def pixels_of(dataset, indices: list[int]) -> torch.Tensor:
    from ukmp.data.images import ImageTransform

    transform = ImageTransform(IMAGE_SIZE, train=False)
    return torch.stack([transform(dataset.open_image(i)) for i in indices])


def check_forward(model, rows: Rows, dataset, cut: int) -> float:
    """Max abs difference between this script's training forward and BLIP-2's own forward (pixel_values), at the
    labelled positions of four rows: training sees what the evaluator will run."""
    picks = [(0, 0), (0, 1), (1, 0), (2, 0)]
    batch = rows.batch(picks)
    pixels = pixels_of(dataset, [rows.first[k] for k in batch["images"].tolist()])
    with torch.no_grad():
        ours, _ = row_logits(model, batch, image_tokens(model, vision_features(model, pixels, cut), cut))
        full = model(pixel_values=pixels[batch["owner"]], input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"]).logits
    return float((ours - full[batch["labels"] != -100]).abs().max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="cache directory (default: $UKMP_REALPARTS or XDG cache)")
    ap.add_argument("--steps", type=int, default=TRAIN["steps"], help="training steps (default %(default)s)")
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock cap on training only (default 60)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it; default 2)")
    ap.add_argument("--lr", type=float, default=TRAIN["lr"])
    ap.add_argument("--vit-lr", type=float, default=TRAIN["vit_lr"], help="learning rate of the trained ViT part")
    ap.add_argument("--images", type=int, default=TRAIN["images"], help="train images per step")
    ap.add_argument("--questions", type=int, default=TRAIN["questions"], help="questions per image per step")
    ap.add_argument("--train-vit", default="last-block", choices=("none", "layernorm", "last-block"),
                    help="which ViT weights also learn (default last-block: DINOv2 is trained to ignore colour)")
    ap.add_argument("--present-weight", type=float, default=1.0,
                    help="draw the yes/no questions about things the image holds this many times as often (default "
                         "1: as they come; easy-VQA asks 82 %% of its yes/no about absent things, which the wording "
                         "answers; see yes_no_probe.py)")
    ap.add_argument("--train-images", type=int, default=0, help="use only the first N train images (0: all 4000)")
    ap.add_argument("--eval-every", type=int, default=TRAIN["eval_every"])
    ap.add_argument("--bench-limit", type=int, default=0,
                    help="score only the first N of the 500 benchmark questions (0: all; a quick check)")
    ap.add_argument("--skip-checks", action="store_true", help="skip the ONNX and perplexity checks")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    reason = assets.missing_extra()
    if reason:
        raise SystemExit(f"error: {reason}")
    t_start = time.monotonic()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = (args.out or assets.default_cache_dir()).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"seed": args.seed, "threads": args.threads, "argv": sys.argv[1:] if argv is None else argv,
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}"}

    from ukmp.data.loaders import load_dataset
    from ukmp.io import AtomicDir, atomic_write_json
    from ukmp.testbed import write_testbed_data

    # 1. the ViT
    t = time.monotonic()
    w = convert.read_onnx_backbone(assets.onnx_path())
    vit_cfg = convert.vision_config(w, IMAGE_SIZE)
    vit_sd = convert.convert_state_dict(w, IMAGE_SIZE)
    data = write_testbed_data(out)
    if not args.skip_checks:
        from PIL import Image

        test_dir = out / "images" / "test"
        files = sorted(test_dir.iterdir(), key=lambda p: int(p.stem))[:4]
        px = np.stack([np.asarray(Image.open(f).convert("RGB").resize((224, 224), Image.BICUBIC), dtype=np.float32)
                       / 255 for f in files])
        report["vit_check"] = convert.check_conversion(assets.onnx_path(), px, w)
        log.info("ViT conversion: %s", report["vit_check"])
    report["vit_seconds"] = round(time.monotonic() - t, 1)

    # 2-3. the LLM and the assembly
    t = time.monotonic()
    lm, tokenizer = load_llm()
    text = assets.write_text_data(out, tokenizer)
    model, processor = assemble(vit_sd, vit_cfg, lm, tokenizer, args.seed)
    if not args.skip_checks:
        alone = perplexity(lm, tokenizer, text["text_heldout"])
        inside = perplexity(model, processor.tokenizer, text["text_heldout"])
        report["lm_check"] = {"standalone": alone, "inside_blip2": inside,
                              "relative_difference": abs(inside["perplexity"] / alone["perplexity"] - 1)}
        log.info("LLM perplexity alone %.4f, inside BLIP-2 %.4f", alone["perplexity"], inside["perplexity"])
    del lm
    report["lm_seconds"] = round(time.monotonic() - t, 1)
    report["parameters"] = {"total": sum(p.numel() for p in model.parameters()),
                            "vision": sum(p.numel() for p in model.vision_model.parameters()),
                            "qformer": sum(p.numel() for p in model.qformer.parameters()) + model.query_tokens.numel()
                            + sum(p.numel() for p in model.language_projection.parameters()),
                            "language": sum(p.numel() for p in model.language_model.parameters())}

    # 4. data the model is not trained on
    configs = {**data["configs"], **text, "captions": write_captions(out, data, args.seed),
               "vqa_bench": write_bench_questions(out)}

    # 5. training
    image_id = int(model.config.image_token_index)
    vqa_train = load_dataset(configs["vqa_train"])
    rows = Rows(vqa_train, processor.tokenizer, image_id)
    if args.train_images:
        rows.images, rows.by_image, rows.first = (rows.images[: args.train_images], rows.by_image[: args.train_images],
                                                  rows.first[: args.train_images])
    side, vit, cut = trainable(model, args.train_vit)
    if not args.skip_checks:
        report["training_forward_max_abs_diff"] = check_forward(model, rows, vqa_train, cut)
        log.info("training forward vs BLIP-2 forward: max abs diff %.2e", report["training_forward_max_abs_diff"])
    t = time.monotonic()
    feats = vision_features(model, pixels_of(vqa_train, rows.first), cut)
    vqa_bench = load_dataset(configs["vqa_bench"], **({"max_samples": args.bench_limit} if args.bench_limit else {}))
    bench_rows = Rows(vqa_bench, processor.tokenizer, image_id)
    bench_feats = vision_features(model, pixels_of(vqa_bench, bench_rows.first), cut)
    report["feature_seconds"] = round(time.monotonic() - t, 1)
    curve_picks = [(k, q) for k in range(len(bench_rows.images)) for q in range(len(bench_rows.by_image[k]))]
    curve_picks = curve_picks[: TRAIN["curve_questions"]]
    cfg = {**TRAIN, "steps": args.steps, "lr": args.lr, "vit_lr": args.vit_lr, "images": args.images,
           "questions": args.questions, "present_weight": args.present_weight,
           "eval_every": args.eval_every}
    info = train(model, rows, feats, cut, side, vit, cfg, args.seed, time.monotonic() + 60 * args.minutes,
                 lambda: accuracy(model, bench_rows, bench_feats, cut, curve_picks))
    report["training"] = {**info, "train_vit": args.train_vit, "config": cfg,
                          "trainable_parameters": sum(p.numel() for p in side + vit)}
    all_picks = [(k, q) for k in range(len(bench_rows.images)) for q in range(len(bench_rows.by_image[k]))]
    report["bench_accuracy_teacher_forced"] = accuracy(model, bench_rows, bench_feats, cut, all_picks)
    log.info("accuracy on the %d benchmark questions: %s", len(all_picks), report["bench_accuracy_teacher_forced"])
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            digest.update(p.detach().numpy().tobytes())
    report["trained_weights_sha256"] = digest.hexdigest()

    model_dir = out / "model"
    for p in model.parameters():
        p.requires_grad_(True)
    with AtomicDir(model_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    report["configs"] = configs
    report["model_dir"] = str(model_dir)
    report["total_minutes"] = round((time.monotonic() - t_start) / 60, 2)
    atomic_write_json(out / "realparts.json", report)
    log.info("wrote %s (%.1f min)", out / "realparts.json", report["total_minutes"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
