"""Build the real-weights testbed's dense LLaVA: DINOv2 ViT-S/14 (a ``SiglipVisionModel`` shell, ``llava_parts``)
+ a two-layer MLP projector + SmolLM2-135M-Instruct, trained LLaVA-style on easy-VQA with the ViT frozen.

    python benchmarks/realparts/build_llava.py --seed 0 --threads 1

1. The tower: DINOv2 converted (exact but for the dropped class token, measured against the exact BLIP-2
   conversion of ``convert.py``); the language model: the cached float32 SmolLM2 (``llava_parts.LLM_DIR``).
2. Data (only what is missing under DIR, never overwriting): easy-VQA in ukmp's formats, the captions
   (calibration / recovery), the fixed 500 test questions; the text YAMLs are reused when present.
3. Stage 1: the projector alone (language model frozen). Stage 2: projector + LoRA on every language-model
   Linear, merged at the end. The tower's hidden state ``--feature-layer`` is computed once per image.
4. The model (+ processor with its chat template) to DIR/llava_model, the report to DIR/realparts_llava.json
   (another ``--model-dir`` NAME: DIR/NAME and DIR/realparts_NAME.json).
Deterministic given seed and threads (``--minutes`` only truncates, and says so).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "src"))

import torch  # noqa: E402

import assets  # noqa: E402
import build  # noqa: E402
import convert  # noqa: E402
import llava_parts  # noqa: E402
import llava_train  # noqa: E402

log = logging.getLogger("realparts.llava")
IMAGE_SIZE = build.IMAGE_SIZE
FEATURE_LAYER = 9  # hidden state after 9 of 12 blocks: earlier than the top, which DINOv2 trained colour-invariant
STAGE1 = {"steps": 40, "images": 8, "questions": 6, "lr": 1e-3, "warmup": 5, "weight_decay": 0.0}
STAGE2 = {"steps": 220, "images": 8, "questions": 6, "lr": 5e-4, "warmup": 10, "weight_decay": 0.0}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
CURVE_QUESTIONS = 100


def write_data(out: Path, seed: int) -> dict[str, str]:
    """The dataset YAMLs under ``out/configs``: each written only when missing (a present one is reused as is)."""
    from ukmp.testbed import write_testbed_data

    cfg = out / "configs"
    configs = {k: str(cfg / f"{k}.yaml") for k in ("vqa_train", "okvqa", "gqa", "cc595k", "captions",
                                                   "vqa_test500", "text_heldout", "text_heldout_eval",
                                                   "text_calibration")}
    if not all(Path(configs[k]).is_file() for k in ("vqa_train", "okvqa", "gqa", "cc595k")):
        if any((out / d).exists() for d in ("vqa", "cc595k", "gqa")):
            raise SystemExit(f"error: {out}: holds part of the easy-VQA data but not its YAMLs; move it aside")
        write_testbed_data(out)
    if not Path(configs["captions"]).is_file():
        build.write_captions(out, {}, seed)
    if not Path(configs["vqa_test500"]).is_file():
        build.write_bench_questions(out)
    missing = [k for k in ("text_heldout", "text_heldout_eval", "text_calibration") if not Path(configs[k]).is_file()]
    if missing:
        raise SystemExit(f"error: {', '.join(configs[k] for k in missing)}: missing (benchmarks/realparts/build.py "
                         f"or language.py writes the text YAMLs)")
    return configs


def add_lora(model, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed + 1)
    return get_peft_model(model, LoraConfig(target_modules=LORA_TARGETS, bias="none", **LORA))


def whitening(feats: torch.Tensor, ridge: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, P): ``(x - mean) @ P`` has about the identity covariance over every token of ``feats``; P is
    symmetric, its eigenvalues ``(lambda + ridge * mean lambda) ** -1/2`` (the ridge keeps noise directions small)."""
    x = feats.reshape(-1, feats.shape[-1]).double()
    mu = x.mean(0)
    lam, vec = torch.linalg.eigh(torch.cov((x - mu).T))
    p = vec @ torch.diag((lam.clamp_min(0) + ridge * lam.mean()) ** -0.5) @ vec.T
    return mu.float(), p.float()


def fold_whitening(linear: torch.nn.Linear, mu: torch.Tensor, white: torch.Tensor) -> None:
    """``linear`` on whitened input made ``linear`` on raw input: W (x - mu) @ P + b = (W P) x + (b - W P mu)
    (``P`` symmetric)."""
    with torch.no_grad():
        linear.bias.copy_(linear.bias - linear.weight @ (white @ mu))
        linear.weight.copy_(linear.weight @ white)


def probe(model, transform, out: Path, n: int, report: dict[str, Any]) -> int:
    """The layer probe of ``--probe`` (the evidence behind :data:`FEATURE_LAYER`)."""
    import json

    from PIL import Image

    from ukmp.io import atomic_write_json

    meta = [m for m in json.loads((out / "cc595k" / "metadata.json").read_text()) if m["colour"] and m["shape"]][:n]
    pixels = torch.stack([transform(Image.open(out / "images" / m["image"])) for m in meta])
    labels = {"colour": [m["colour"] for m in meta], "shape": [m["shape"] for m in meta]}
    report["probe"] = llava_parts.layer_probe(model, pixels, labels, fit=2 * n // 3)
    atomic_write_json(out / "realparts_llava_probe.json", report)
    print(json.dumps(report["probe"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="cache directory (default: $UKMP_REALPARTS or XDG cache)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it; default 1)")
    ap.add_argument("--feature-layer", type=int, default=FEATURE_LAYER,
                    help="the tower's hidden state the LM reads (0: embeddings, 12: last block; default %(default)s)")
    ap.add_argument("--stage1-steps", type=int, default=STAGE1["steps"])
    ap.add_argument("--stage2-steps", type=int, default=STAGE2["steps"])
    ap.add_argument("--present-weight", type=float, default=2.0,
                    help="weight of the yes/no questions about what the image holds in each image's draw (default 2)")
    ap.add_argument("--train-images", type=int, default=2400, help="the first N train images (default 2400)")
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock cap on both stages (truncates)")
    ap.add_argument("--model-dir", default="llava_model", help="under --out (default llava_model; must not exist)")
    ap.add_argument("--whiten", action="store_true",
                    help="option: the projector learns on whitened features (the train features' mean and covariance, "
                         "ridge 1 %% of the mean eigenvalue), folded exactly into its first Linear at the end")
    ap.add_argument("--timing", type=int, default=0, help="run N stage-2 steps, print their time, write nothing")
    ap.add_argument("--probe", type=int, default=0,
                    help="only the layer probe (llava_parts.layer_probe) on the first N train images with a known colour "
                         "and shape (two thirds fit, a third scored); writes DIR/realparts_llava_probe.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.monotonic()
    out = (args.out or assets.default_cache_dir()).expanduser().resolve()
    model_dir = out / args.model_dir
    if model_dir.exists() and not (args.timing or args.probe):
        raise SystemExit(f"error: {model_dir}: exists; remove it or pass another --model-dir")
    report: dict[str, Any] = {"seed": args.seed, "threads": args.threads, "argv": sys.argv[1:] if argv is None else argv,
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}",
                              "load_at_start": os.getloadavg()[0], "feature_layer": args.feature_layer,
                              "whiten": args.whiten}
    from ukmp.data.images import ImageTransform
    from ukmp.data.loaders import load_dataset
    from ukmp.io import AtomicDir, atomic_write_json
    from ukmp.models import adapter_for

    configs = write_data(out, args.seed)
    w = convert.read_onnx_backbone(assets.onnx_path())
    lm, tok = llava_parts.load_llm(out)
    model, processor = llava_parts.assemble(w, lm, tok, IMAGE_SIZE, args.feature_layer, args.seed)
    del lm
    layout = adapter_for(model).batch_layout()
    transform = ImageTransform.for_layout(layout)
    if args.probe:
        return probe(model, transform, out, args.probe, report)
    train_ds, bench_ds = load_dataset(configs["vqa_train"]), load_dataset(configs["vqa_test500"])
    rows, bench = llava_train.Rows(train_ds, processor, layout), llava_train.Rows(bench_ds, processor, layout)
    n_img = min(args.train_images or len(rows.images), len(rows.images))
    rows.images, rows.by_image, rows.first = rows.images[:n_img], rows.by_image[:n_img], rows.first[:n_img]
    t = time.monotonic()
    bench_px = torch.stack([transform(bench_ds.open_image(i)) for i in bench.first])
    report["cls_deviation"] = llava_parts.cls_deviation(w, bench_px[:64], IMAGE_SIZE, [args.feature_layer, 12])
    log.info("class token dropped, patch tokens vs the exact conversion: %s", report["cls_deviation"])
    train_px = torch.stack([transform(train_ds.open_image(i)) for i in rows.first])
    feats = llava_parts.features(model, train_px, args.feature_layer)
    bench_feats = llava_parts.features(model, bench_px, args.feature_layer)
    report["feature_minutes"] = round((time.monotonic() - t) / 60, 2)
    check_picks = [(0, 0), (0, 1), (1, 0), (2, 0)]
    report["forward_check_max_abs_diff"] = llava_train.check_forward(model, rows, feats, train_px, check_picks)
    log.info("shared-prefix forward vs the stock forward: max abs diff %.2e", report["forward_check_max_abs_diff"])
    if report["forward_check_max_abs_diff"] > 1e-3:
        raise SystemExit("error: the training forward differs from the model's own (see the log)")
    raw_bench = bench_feats
    if args.whiten:
        mu, white = whitening(feats)
        feats, bench_feats = (feats - mu) @ white, (bench_feats - mu) @ white
    all_bench = [(k, q) for k in range(len(bench.images)) for q in range(len(bench.by_image[k]))]
    curve_picks = all_bench[:CURVE_QUESTIONS]

    def curve():
        return llava_train.accuracy(model, bench, bench_feats, curve_picks)

    deadline = time.monotonic() + 60 * args.minutes
    for p in model.parameters():
        p.requires_grad_(False)
    proj = list(model.model.multi_modal_projector.parameters())
    for p in proj:
        p.requires_grad_(True)
    s1 = {**STAGE1, "steps": args.stage1_steps, "present_weight": args.present_weight, "eval_every": args.eval_every}
    s2 = {**STAGE2, "steps": args.stage2_steps, "present_weight": args.present_weight, "eval_every": args.eval_every}
    if args.timing:
        s1 = {**s1, "steps": args.timing}
    report["stage1"] = {**llava_train.run_stage(model, rows, feats, proj, s1, args.seed, 0, deadline, log,
                                                None if args.timing else curve), "config": s1}
    peft_model = add_lora(model, args.seed)
    lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    for p in proj:
        p.requires_grad_(True)
    if args.timing:
        s2 = {**s2, "steps": args.timing}
    report["stage2"] = {**llava_train.run_stage(model, rows, feats, proj + lora, s2, args.seed, s1["steps"], deadline,
                                                log, None if args.timing else curve),
                        "config": s2, "lora": LORA, "lora_parameters": sum(p.numel() for p in lora)}
    if args.timing:
        print({k: report[k]["train_minutes"] for k in ("stage1", "stage2")}, report["forward_check_max_abs_diff"])
        return 0
    model = peft_model.merge_and_unload()
    if args.whiten:
        fold_whitening(model.model.multi_modal_projector.linear_1, mu, white)
        bench_feats = raw_bench
    report["train_minutes"] = round(report["stage1"]["train_minutes"] + report["stage2"]["train_minutes"], 2)
    report["bench_accuracy_teacher_forced"] = llava_train.accuracy(model, bench, bench_feats, all_bench)
    log.info("accuracy on the %d benchmark questions: %s", len(all_bench), report["bench_accuracy_teacher_forced"])
    digest = hashlib.sha256()
    for _, p in sorted(model.named_parameters()):
        digest.update(p.detach().numpy().tobytes())
    report["weights_sha256"] = digest.hexdigest()
    for p in model.parameters():
        p.requires_grad_(True)
    with AtomicDir(model_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    report.update(configs=configs, model_dir=str(model_dir), total_minutes=round((time.monotonic() - t_start) / 60, 2),
                  load_at_end=os.getloadavg()[0])
    path = out / ("realparts_llava.json" if args.model_dir == "llava_model" else f"realparts_{args.model_dir}.json")
    atomic_write_json(path, report)
    log.info("wrote %s (%.1f min)", path, report["total_minutes"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
