"""Why the real-weights build stops below 90 %: can its frozen language model answer easy-VQA's yes/no questions?

easy-VQA's yes/no questions mostly ask about things the image does not hold ("absent"), which the wording alone
answers; only the "present" ones (``build.question_kind``) need the image. The built model gets 99 % of the absent
ones and 2 % of the present ones, so it answers from the wording. Two probes ask whether more training of the
Q-Former side could change that, with the language model frozen as BLIP-2's second stage requires:

    python benchmarks/realparts/yes_no_probe.py caption [--questions 0]
        the built model's language model alone, given the image's TRUE colour and shape in words before the
        question (the best any 8 query tokens could tell it): yes/no accuracy per kind, for several prompt formats
    python benchmarks/realparts/yes_no_probe.py finetune [--present-weight 5] [--steps 200] [--lr 5e-4]
        the built model trained on, as build.py trains it, but with the present yes/no questions drawn
        ``--present-weight`` times as often: accuracy per kind every ``--eval-every`` steps

Both read the model of build.py (DIR/model) and write DIR/yes_no_probe_<mode>.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "src"))

import torch  # noqa: E402

import assets  # noqa: E402
import build  # noqa: E402

log = logging.getLogger("realparts.probe")
CAPTION_PROMPTS = (
    "A {colour} {shape}. Question: {question} Short answer:",
    "Image: a {colour} {shape}.\nQuestion: {question} Short answer:",
    "<|im_start|>user\nThe image shows a {colour} {shape}. {question} Answer yes or no.<|im_end|>\n"
    "<|im_start|>assistant\nThe answer is",
)


def image_facts(records) -> dict[str, dict[str, str]]:
    """{image: {"colour": ..., "shape": ...}} from the answers of each image's open questions."""
    facts: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for r in records:
        kind = build.question_type(r.answers[0])
        if kind != "yes/no":
            facts[r.image][kind] = r.answers[0]
    return facts


def caption_probe(model_dir: Path, configs: dict[str, Any], per_kind: int) -> dict[str, Any]:
    """Yes/no accuracy per kind of the frozen LM given the true caption: the larger of the " yes" / " no" logits
    after each prompt, over the benchmark's present and absent questions (the first ``per_kind`` of each; 0: all)."""
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration

    from ukmp.data.loaders import load_dataset

    lm = Blip2ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).language_model.eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    yes, no = (tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "no"))
    facts = image_facts(load_dataset(configs["okvqa"]).records)  # every test question: each image's colour, shape
    picked: dict[str, list] = {"yes/no: present": [], "yes/no: absent": []}
    for r in load_dataset(configs["vqa_bench"]).records:
        kind = build.question_kind(r.question, r.answers[0])
        f = facts[r.image]
        if kind in picked and (not per_kind or len(picked[kind]) < per_kind) and {"colour", "shape"} <= set(f):
            picked[kind].append((r, f))
    out: dict[str, Any] = {}
    with torch.no_grad():
        for fmt in CAPTION_PROMPTS:
            row = {}
            for kind, items in picked.items():
                hits = []
                for r, f in items:
                    ids = tok(fmt.format(question=r.question, **f), return_tensors="pt")["input_ids"]
                    logits = lm(ids).logits[0, -1]
                    hits.append(("yes" if logits[yes] > logits[no] else "no") == r.answers[0])
                row[kind] = round(100 * sum(hits) / len(hits), 1)
            out[fmt] = row
            log.info("%r: %s", fmt, row)
    return {"questions": {kind: len(items) for kind, items in picked.items()}, "by_prompt": out}


def finetune_probe(model_dir: Path, configs: dict[str, Any], weight: float, steps: int, lr: float, images: int,
                   eval_every: int, seed: int) -> dict[str, Any]:
    """The built model trained further as build.py trains it (Q-Former side at ``lr``, the ViT's last block at
    ``lr / 5``, 8 images x 4 questions a step, constant rate), the present yes/no questions drawn ``weight`` times as
    often (weighted sampling without replacement per image); accuracy per kind on the 500 benchmark questions."""
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration

    from ukmp.data.loaders import load_dataset

    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    image_id = int(model.config.image_token_index)
    train = load_dataset(configs["vqa_train"])
    rows = build.Rows(train, tok, image_id)
    if images:
        rows.images, rows.by_image, rows.first = rows.images[:images], rows.by_image[:images], rows.first[:images]
    bench = load_dataset(configs["vqa_bench"])
    brows = build.Rows(bench, tok, image_id)
    side, vit, cut = build.trainable(model, "last-block")
    feats = build.vision_features(model, build.pixels_of(train, rows.first), cut)
    bfeats = build.vision_features(model, build.pixels_of(bench, brows.first), cut)
    picks = [(k, q) for k in range(len(brows.images)) for q in range(len(brows.by_image[k]))]

    def evaluate(step: int) -> dict[str, Any]:
        model.eval()
        point = {"step": step, **build.accuracy(model, brows, bfeats, cut, picks)}
        model.train()
        log.info("%s", point)
        return point

    curve = [evaluate(0)]
    opt = torch.optim.AdamW([{"params": side, "lr": lr}, {"params": vit, "lr": lr / 5}], betas=(0.9, 0.98),
                            weight_decay=0.0)
    rng = random.Random(seed)
    losses: list[float] = []
    t0 = time.monotonic()
    model.train()
    for step in range(steps):
        picks = [(k, q) for k in rng.sample(range(len(rows.images)), 8)
                 for q in build.draw_questions(rows, k, 4, weight, rng)]
        losses.append(build.train_step(model, rows, feats, cut, picks, opt, side + vit, 1.0))
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append(evaluate(step + 1))
    return {"present_weight": weight, "steps": steps, "lr": lr, "train_images": len(rows.images),
            "minutes": round((time.monotonic() - t0) / 60, 1), "curve": curve,
            "loss_every_10": [round(sum(losses[i:i + 10]) / len(losses[i:i + 10]), 4)
                              for i in range(0, len(losses), 10)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("caption", "finetune"))
    ap.add_argument("--out", type=Path, default=None, help="the build's directory (default: as build.py)")
    ap.add_argument("--questions", type=int, default=0,
                    help="caption: benchmark questions per yes/no kind (0: all, 59 present and 297 absent)")
    ap.add_argument("--present-weight", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--train-images", type=int, default=1000, help="finetune: the first N train images")
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    out = (args.out or assets.default_cache_dir()).expanduser().resolve()
    report_path = out / "realparts.json"
    if not (out / "model").is_dir() or not report_path.is_file():
        raise SystemExit(f"error: {out}: no built model; run python benchmarks/realparts/build.py first")
    configs = json.loads(report_path.read_text())["configs"]
    from ukmp.io import atomic_write_json

    t0 = time.monotonic()
    if args.mode == "caption":
        result = caption_probe(out / "model", configs, args.questions)
    else:
        result = finetune_probe(out / "model", configs, args.present_weight, args.steps, args.lr, args.train_images,
                                args.eval_every, args.seed)
    result.update(mode=args.mode, argv=sys.argv[1:] if argv is None else argv, threads=args.threads,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  seconds=round(time.monotonic() - t0, 1))
    atomic_write_json(out / f"yes_no_probe_{args.mode}.json", result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
