"""Export benchmark (issue 26): pruned models run where they are served, and their real speed measured there.

    python benchmarks/bench_export.py [--ratios 0.2,0.3,0.5] [--threads 1] [--reps 5] [--work DIR]
                                      [--runs-root outputs/realparts_lm_quality] [--no-onnx] [--tiny]

SmolLM2-135M-Instruct (real weights: the realparts extra, dequantised to float32 once, as the language track of
``benchmarks/realparts/language.py``) pruned by UKMP at each ratio through the pipeline: the track's stages under
``--runs-root`` are reused when finished (read only) and run there otherwise. The dense model and every pruned one
are exported with ``ukmp export`` to GGUF f32 (arch ``deci``) and ONNX, and the f32 GGUF is quantised to Q8_0 by
llama.cpp's own quantizer (a matrix whose rows are not whole 32-value blocks stays in llama.cpp's fallback type:
listed per file). Then, on this CPU with ``--threads``:

* speed: llama.cpp (llama-cpp-python) prompt (pp) and generation (tg) tokens/s, and ONNX Runtime's full-sequence
  graph; every model is measured once per repetition, the models alternated (the order rotated) within one run,
  the median of ``--reps`` kept, and each pruned model's speed-up is the median of its per-repetition ratios to
  the dense model of the same engine and weight type;
* the ideal speed-up next to it: the FLOP ratio (every Linear with the vocabulary head, attention over the
  context at the measured positions; ``export_engines.flops``);
* perplexity of the first ``--ppl-windows`` held-out windows of 512 tokens as PyTorch (float32), llama.cpp (F32
  KV cache; f32 and q8_0 files) and ONNX Runtime compute it, on the same token ids (the HF tokenizer's);
* file sizes.

``--tiny``: a tiny Llama built from a config with a byte-level BPE tokenizer trained on the fly and magnitude plans
(no hub, no data files: the cheap test of this script); its speeds mean nothing. Results: ``bench_export.{json,md,
png}`` in ``--out`` (benchmarks/results). Target: the 50 %-pruned model generates >= 1.5x the dense model's
tokens/s in llama.cpp.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (ROOT / "src", HERE, HERE / "realparts"):
    sys.path.insert(0, str(p))

import export_engines as eng  # noqa: E402
from bench_export_report import write_outputs  # noqa: E402

log = logging.getLogger("bench_export")
TARGET = ("ukmp@0.5", 1.5)  # the target: tg speed-up of the 50 %-pruned model in llama.cpp (f32)
TINY_WORDS = ("the cat sat on a red mat while two dogs ran across the green park and a man read an old book near "
              "the river under a blue sky with white clouds").split()


# ---------------------------------------------------------------------------------------------------- the models
def keep_all_dir(model, tok, out: Path) -> Path:
    """The dense model as a ukmp pruned-model directory (a keep-all plan): what every export starts from."""
    from ukmp.io import save_pruned
    from ukmp.models import adapter_for
    from ukmp.plan import PruningPlan

    if not (out / "ukmp.json").is_file():
        groups = adapter_for(model).groups()
        plan = PruningPlan(keep={g.id: list(range(g.n_units)) for g in groups}, units={g.id: g.n_units for g in groups})
        save_pruned(model, plan, out, processor=tok)
    return out


def prepare_real(ratios: list[float], runs_root: Path, work: Path) -> tuple[dict[str, Path], Any, list[int], dict]:
    """({name: pruned-model dir}, tokenizer, held-out token ids, per-run info) of SmolLM2-135M-Instruct."""
    import assets
    import language
    from transformers import AutoTokenizer

    from ukmp.data.loaders import load_dataset
    from ukmp.models.build import load_model

    cache = assets.default_cache_dir()
    model_over = language.real_model_overrides(cache)  # dequantises the GGUF once; writes the text data if missing
    dense_src = Path(model_over[0].split("=", 1)[1])
    tok = AutoTokenizer.from_pretrained(str(dense_src))
    dirs = {"dense": keep_all_dir(load_model(dense_src, dtype="float32"), tok, work / "dense_model")}
    configs = [str(language.CONFIG)]
    over = [*model_over, "prune.num_samples=32", "eval.max_samples=8", "finetune.enabled=false",
            f"eval.after_prune=[{language.TASK}]", f"eval.after_finetune=[{language.TASK}]"]
    info = {}
    for r in ratios:
        rdir = language.ratio_dir(runs_root, r)
        stage = rdir / "ukmp" / "prune"
        if not (stage / "stage.json").is_file():
            log.info("pruning with UKMP at %s under %s", r, rdir)
            language.run_method(configs, over, "ukmp", r, rdir, language.score_reuse("ukmp", ("ukmp",), r,
                                                                                      ratios[0], runs_root))
        summary = json.loads((stage / "summary.json").read_text())
        info[f"ukmp@{r}"] = {"achieved_ratio": summary["achieved_ratio"], "dir": str(stage / "model")}
        dirs[f"ukmp@{r}"] = stage / "model"
    ids = load_dataset(cache / "configs" / "text_heldout.yaml").token_ids(tok)
    return dirs, tok, ids, info


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(TINY_WORDS)] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def prepare_tiny(ratios: list[float], work: Path, seed: int) -> tuple[dict[str, Path], Any, list[int], dict]:
    """A tiny Llama (tied embeddings, GQA, MLP 352 wide) and magnitude plans at ``ratios`` (random weights)."""
    import copy

    import torch

    from ukmp.config import PruneConfig
    from ukmp.io import save_pruned
    from ukmp.models import adapter_for, count_parameters
    from ukmp.models.build import build_model, config_from_dict
    from ukmp.prune.allocate import AllocationConfig, allocate
    from ukmp.prune.scoring import score_magnitude

    tok = tiny_tokenizer()
    d = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": len(tok), "hidden_size": 128,
         "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 16, "intermediate_size": 352,
         "num_hidden_layers": 3, "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
         "hidden_act": "silu", "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0}
    dense = build_model(config_from_dict(d), seed=seed).float().eval()
    dirs = {"dense": keep_all_dir(dense, tok, work / "dense_model")}
    info = {}
    for r in ratios:
        out = work / f"ukmp_{r}"
        if not (out / "ukmp.json").is_file():
            model = copy.deepcopy(dense)
            adapter = adapter_for(model)
            groups = adapter.groups()
            scores = score_magnitude(model, groups, lambda epoch: iter(()), PruneConfig(), 0).scores
            plan = allocate(scores, groups, count_parameters(model), AllocationConfig(target_ratio=r))
            adapter.apply_(model, plan)
            save_pruned(model, plan, out, processor=tok)
        info[f"ukmp@{r}"] = {"plan": "magnitude (random weights)", "dir": str(out)}
        dirs[f"ukmp@{r}"] = out
    rng = random.Random(seed)
    text = " ".join(rng.choice(TINY_WORDS) for _ in range(1200))
    torch.manual_seed(seed)
    return dirs, tok, tok(text, add_special_tokens=False)["input_ids"], info


# ---------------------------------------------------------------------------------------------------- exports
def export_all(dirs: dict[str, Path], work: Path, threads: int, onnx: bool) -> dict[str, dict[str, Any]]:
    """{name: {format: path}} of every export under ``work`` (those already there are reused)."""
    from ukmp.export import export

    files: dict[str, dict[str, Any]] = {}
    for name, src in dirs.items():
        stem = name.replace("@", "_")
        f = files[name] = {"gguf_f32": work / f"{stem}.f32.gguf", "gguf_q8_0": work / f"{stem}.q8_0.gguf"}
        if not f["gguf_f32"].exists():
            log.info("export %s -> %s", name, f["gguf_f32"])
            export(src, "gguf", f["gguf_f32"], dtype="f32")
        if not f["gguf_q8_0"].exists():
            eng.quantize_q8_0(f["gguf_f32"], f["gguf_q8_0"], threads)
        if onnx:
            f["onnx"] = work / f"{stem}.onnx"
            if not f["onnx"].exists():
                log.info("export %s -> %s", name, f["onnx"])
                export(src, "onnx", f["onnx"])
    return files


def padded_source(base: Path, multiple: int):
    """The pruned model at ``base`` (a ukmp export Source, float32) with every MLP zero-padded up to a multiple of
    ``multiple`` channels, as ``ukmp export --pad-multiple`` writes it (the same function)."""
    from ukmp.export.gguf import pad_mlp_
    from ukmp.export.source import load_source

    src = load_source(base, "gguf", "float32")
    pad_mlp_(src, multiple)
    return src


def export_padded(base: Path, name: str, work: Path, multiple: int, threads: int) -> dict[str, Path]:
    """``ukmp export --format gguf --pad-multiple N`` (f32) and llama.cpp's Q8_0 of it (reused when there)."""
    from ukmp.export import export

    stem = name.replace("@", "_").replace("+", "_")
    f = {"gguf_f32": work / f"{stem}.f32.gguf", "gguf_q8_0": work / f"{stem}.q8_0.gguf"}
    if not f["gguf_f32"].exists():
        log.info("export %s -> %s", name, f["gguf_f32"])
        export(base, "gguf", f["gguf_f32"], dtype="f32", pad_multiple=multiple)
    if not f["gguf_q8_0"].exists():
        eng.quantize_q8_0(f["gguf_f32"], f["gguf_q8_0"], threads)
    return f


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".onnx", ".data")) if path.is_dir() \
        else path.stat().st_size


# ---------------------------------------------------------------------------------------------------- measuring
def windows_of(ids: list[int], window: int, n: int) -> list[list[int]]:
    out = [ids[s: s + window] for s in range(0, len(ids) - 1, window)][:n]
    if not out or len(out[0]) < 2:
        raise ValueError("held-out text: fewer than 2 tokens")
    return out


def alternate(names: list[str], reps: int, step) -> dict[str, list[dict[str, float]]]:
    """``step(name)`` for every name, ``reps`` times, the order rotated each repetition."""
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for k in range(reps):
        for n in names[k % len(names):] + names[: k % len(names)]:
            runs[n].append(step(n))
    return runs


def summarise(runs: dict[str, list[dict[str, float]]], dense: str) -> dict[str, dict[str, Any]]:
    """Median per metric and the median of the per-repetition ratios to ``dense``."""
    out = {}
    for n, rs in runs.items():
        row: dict[str, Any] = {}
        for key in rs[0]:
            vals = [r[key] for r in rs if r[key] is not None]
            if not vals:
                continue
            row[key] = statistics.median(vals)
            row[key + "_reps"] = [round(v, 2) for v in vals]
            if n != dense:
                row[key + "_speedup"] = statistics.median(r[key] / d[key] for r, d in zip(rs, runs[dense], strict=True)
                                                          if r[key] and d[key])
        out[n] = row
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ukmp.io import load_pruned
    from ukmp.models import count_parameters

    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load0 = list(os.getloadavg())
    t_start = time.perf_counter()
    if args.tiny:
        dirs, tok, ids, info = prepare_tiny(ratios, work, args.seed)
    else:
        dirs, tok, ids, info = prepare_real(ratios, Path(args.runs_root), work)
    windows = windows_of(ids, args.window, args.ppl_windows)
    prompt = ids[: args.pp]
    files = export_all(dirs, work, args.threads, not args.no_onnx)
    padded = {}  # name -> the pruned model it pads
    if args.pad_multiple:
        for name in [n for n in dirs if n != "dense"]:
            padded[f"{name}+pad{args.pad_multiple}"] = name
        for pname, base in padded.items():
            files[pname] = export_padded(dirs[base], pname, work, args.pad_multiple, args.threads)
    names = list(dirs) + list(padded)
    models: dict[str, dict[str, Any]] = {}
    for name in names:  # PyTorch: parameters, FLOPs, perplexity
        model = (padded_source(dirs[padded[name]], args.pad_multiple).model if name in padded
                 else load_pruned(dirs[name], dtype="float32")).eval()
        fm = eng.flop_model(model)
        models[name] = {
            "params": count_parameters(model), "flops": fm,
            "flops_pp": eng.flops(fm, 0, args.pp), "flops_tg": eng.flops(fm, args.pp, args.tg),
            "sizes": {k: size_of(p) for k, p in files[name].items()},
            "q8_0_types": eng.tensor_types(files[name]["gguf_q8_0"]),
            "ppl": {"torch_f32": eng.torch_nll(model, windows)}, **info.get(name, {})}
        del model
        log.info("%s: PyTorch perplexity %.4f", name, models[name]["ppl"]["torch_f32"]["perplexity"])
    for name in names:  # the engines' perplexity
        m = models[name]
        m["ppl"]["llama_cpp_f32"] = eng.llama_nll(files[name]["gguf_f32"], windows, args.threads)
        m["ppl"]["llama_cpp_q8_0"] = eng.llama_nll(files[name]["gguf_q8_0"], windows, args.threads)
        if "onnx" in files[name]:
            m["ppl"]["onnx_runtime"] = eng.ort_nll(files[name]["onnx"], windows, args.threads)
        log.info("%s: perplexity %s", name, {k: round(v["perplexity"], 4) for k, v in m["ppl"].items()})
    d = models["dense"]
    for m in models.values():
        m["ideal_speedup"] = {"pp": d["flops_pp"] / m["flops_pp"], "tg": d["flops_tg"] / m["flops_tg"],
                              "params": d["params"] / m["params"]}
    speed: dict[str, Any] = {}
    for wt in ("f32", "q8_0"):
        llms = {n: eng.open_llama(files[n][f"gguf_{wt}"], args.pp + args.tg + 8, args.threads) for n in names}
        for n in names:  # warm-up: page the weights in
            eng.llama_speed_step(llms[n], prompt[:8], 2)
        speed[f"llama_cpp_{wt}"] = summarise(alternate(names, args.reps, lambda n, llms=llms: eng.llama_speed_step(
            llms[n], prompt, args.tg)), "dense")
        for llm in llms.values():
            llm.close()
        log.info("llama.cpp %s: %s", wt, {n: round(v["tg_tps"], 1) for n, v in speed[f"llama_cpp_{wt}"].items()})
    if not args.no_onnx:
        with_onnx = [n for n in names if "onnx" in files[n]]
        sessions = {n: eng.open_ort(files[n]["onnx"], args.threads) for n in with_onnx}
        for n in with_onnx:
            eng.ort_speed_step(sessions[n], prompt[:8])
        speed["onnx_runtime"] = summarise(alternate(with_onnx, args.reps, lambda n: eng.ort_speed_step(
            sessions[n], prompt)), "dense")
    tok_check = None
    if not args.tiny:  # llama.cpp's own tokenizer on the first 4,000 characters of the held-out text
        import llama_cpp

        text = tok.decode(ids[:800])
        vocab = llama_cpp.Llama(str(files["dense"]["gguf_f32"]), vocab_only=True, verbose=False)
        got = vocab.tokenize(text.encode(), add_bos=False, special=False)
        ref = tok(text, add_special_tokens=False)["input_ids"]
        tok_check = {"hf_tokens": len(ref), "llama_cpp_tokens": len(got), "identical": got == ref}
    import llama_cpp
    import onnxruntime

    return {
        "models": models, "speed": speed, "names": names, "ratios": ratios, "target": list(TARGET),
        "padded": padded, "pad_multiple": args.pad_multiple,
        "tokenizer_check": tok_check,
        "setup": {"tiny": args.tiny, "threads": args.threads, "reps": args.reps, "pp_tokens": args.pp,
                  "tg_tokens": args.tg, "ppl_windows": len(windows), "window": args.window,
                  "ppl_tokens": sum(len(w) - 1 for w in windows), "work": str(work),
                  "llama_cpp_python": llama_cpp.__version__, "onnxruntime": onnxruntime.__version__,
                  "torch": torch.__version__, "runs_root": None if args.tiny else str(args.runs_root)},
        "machine": machine(load0),
        "command": "python benchmarks/bench_export.py " + " ".join(args.argv),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }


def machine(load0: list[float]) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_at_start": load0,
            "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", default="0.2,0.3,0.5")
    p.add_argument("--threads", type=int, default=1, help="threads of torch, llama.cpp and ONNX Runtime")
    p.add_argument("--reps", type=int, default=5, help="repetitions of every speed measurement (median)")
    p.add_argument("--pp", type=int, default=128, help="prompt tokens")
    p.add_argument("--tg", type=int, default=32, help="generated tokens")
    p.add_argument("--ppl-windows", type=int, default=8, help="held-out windows scored by every engine")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--runs-root", default=str(ROOT / "outputs" / "realparts_lm_quality"),
                   help="the language track's runs (finished UKMP prune stages are reused, missing ones run here)")
    p.add_argument("--work", default=str(ROOT / "outputs" / "bench_export"), help="exported files (reused)")
    p.add_argument("--out", default=str(HERE / "results"), help="where bench_export.{json,md,png} are written")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--pad-multiple", type=int, default=32,
                   help="also run each pruned model with its MLP zero-padded to a multiple of N channels (the same "
                        "function; rows llama.cpp's kernels and Q8_0 blocks take whole): rows '+padN'; 0: none")
    p.add_argument("--tiny", action="store_true", help="a tiny random-weight Llama (the script's test)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if not eng.have_llama_cpp():
        raise SystemExit("bench_export.py: llama_cpp: not installed; pip install 'ukmp[export]' (see pyproject)")
    missing = [] if args.no_onnx else [m for m in ("onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:  # before any export: the ONNX rows would fail after minutes of work
        raise SystemExit(f"bench_export.py: {', '.join(missing)}: not installed; pip install 'ukmp[export]' "
                         f"(see pyproject), or pass --no-onnx")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)  # the ONNX exporter's optimiser logs every initialiser at INFO
    result = run(args)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    print(write_outputs(result, Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
