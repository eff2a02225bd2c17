"""The ``ukmp`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

DESCRIPTION = """\
ukmp prunes whole attention heads and MLP channels of vision-language models (BLIP-2 with FlanT5, OPT or Llama;
InstructBLIP; LLaVA) and of plain Llama / Mistral / Qwen2 / OPT language models, and recovers what pruning lost.
Pruned models are plain transformers models that reload in one call (ukmp.io.load_pruned).

Typical use:
  ukmp inspect blip2-flan-t5-xl            structure and parameter budget of the full-size model (offline)
  ukmp inspect outputs/demo/prune/model    the same for a pruned model directory
  ukmp demo                                the whole pipeline on a tiny model and sample data (CPU; 49 s on
                                           2 idle cores, 2026-11-29, more when the machine is busy)
  ukmp compare configs/base.yaml --methods-dir configs/methods --ratio 0.5   UKMP vs every baseline
  ukmp run configs/ukmp_0.5.yaml           prune -> eval -> finetune -> eval, as scripts/structured_blip2/ukmp_0.5.py
  ukmp prune configs/ukmp_0.5.yaml prune.ratio=0.3
  ukmp plan --scores outputs/ukmp_0.5/prune/scores.safetensors --ratio 0.3 --out plan_0.3.json
  ukmp prune configs/ukmp_0.5.yaml --plan plan_0.3.json name=ukmp_0.3    apply that plan without scoring
  python scripts/llava/ukmp_0.2.py configs/tiny.yaml    any shipped script or config on its family's tiny model

Config files and key=value overrides may come before or after a subcommand's options.
"""


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ukmp.inspect import format_inspect, inspect_model

    report = inspect_model(args.model)
    print(json.dumps(report, indent=1) if args.json else format_inspect(report))
    return 0


_OVERRIDE = re.compile(r"[A-Za-z_][\w.\-]*=")  # a dotted key, then '=' (the value may be a .yaml path)


def _split_config_args(items: list[str]) -> tuple[list[str], list[str]]:
    """CONFIG files and ``key=value`` overrides, in any order: ``data.calibration=/x/cc595k.yaml`` is an override,
    ``configs/ukmp_0.5.yaml`` (no ``key=``) a file."""
    configs, overrides = [], []
    for it in items:
        (overrides if _OVERRIDE.match(it) else configs).append(it)
    return configs, overrides


def _load_cfg(args: argparse.Namespace, reach=None):
    """The config of CONFIG files and overrides, validated, and (``reach``: a function of the config giving a
    :class:`ukmp.preflight.Reach`) the tasks, datasets and Java the command will reach: all before torch loads.
    Every command that runs stages needs a config file: the bare defaults are Table A's full budget under
    outputs/demo, where they would overwrite the demo."""
    from ukmp.config import load_config

    configs, overrides = _split_config_args(args.config)
    if reach is not None and not configs:
        raise ValueError(NO_CONFIG.format(command=args.command))
    cfg = load_config(configs, overrides)
    if reach is not None:
        from ukmp.method_traits import TRAITS
        from ukmp.preflight import check_reach

        # a built-in method's traits are known without torch; a plugin's only once the registry loads (then
        # pipeline.preflight checks the calibration data)
        method = cfg.prune.method
        check_reach(cfg, reach(cfg), data_free=TRAITS[method].data_free if method in TRAITS else None)
    return cfg


NO_CONFIG = ("no config file given; `make demo` (or `ukmp demo`) runs the tiny demo, a real run names one from "
             "configs/, e.g. `ukmp {command} configs/ukmp_0.5.yaml`")


def _cmd_run(args: argparse.Namespace) -> int:
    from ukmp.preflight import pipeline_reach

    cfg = _load_cfg(args, lambda c: pipeline_reach(c, tuple(args.only or ())))  # before torch, transformers
    from ukmp.pipeline import run

    out = run(cfg, force=tuple(args.force or ()), only=tuple(args.only or ()))
    print(json.dumps({k: out[k] for k in ("name", "method", "target_ratio", "achieved_ratio", "metrics")}, indent=1))
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ukmp.preflight import Reach

    if args.plan:
        args.config = [*args.config, f"prune.plan_from={args.plan}"]
    cfg = _load_cfg(args, lambda c: Reach(prune=True))
    from ukmp.pipeline import preflight, prune_stage

    preflight(cfg, Reach(prune=True))
    rec = prune_stage(cfg, Path(cfg.output_dir) / cfg.name, force=args.force_stage)
    print(json.dumps({"prune_dir": str(rec.path), "skipped": rec.skipped, **rec.info}, indent=1))
    return 0


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"--ratio: must be in [0, 1), got {ratio}")


def _cmd_plan(args: argparse.Namespace) -> int:
    _check_ratio(args.ratio)
    for flag, v in (("--units-per-step", args.units_per_step),
                    ("--fine-units-per-step", args.fine_units_per_step), ("--width-multiple", args.width_multiple)):
        if v is not None and v < 1:
            raise ValueError(f"{flag}: must be >= 1, got {v}")
    from ukmp.prune.reuse import replan
    from ukmp.prune.stage import check_shortfall

    plan = replan(args.scores, args.ratio, normalization=args.normalization, scope=args.scope,
                  units_per_step=args.units_per_step, fine_units_per_step=args.fine_units_per_step,
                  width_multiple=args.width_multiple, rank_by=args.rank_by)
    check_shortfall(plan, args.allow_shortfall, "--allow-shortfall")
    plan.save(args.out)
    m = plan.meta
    print(json.dumps({"plan": args.out, "target_ratio": m.get("target_ratio"), "achieved_ratio": m.get("achieved_ratio"),
                      "removed_params": m.get("removed_params"), "digest": plan.digest()}, indent=1))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ukmp.preflight import Reach

    def reach(c):
        return Reach(tasks=(("--tasks", tuple(args.tasks.split(","))) if args.tasks else
                            ("eval.after_finetune", tuple(c.eval.after_finetune)),))

    cfg = _load_cfg(args, reach)
    from ukmp.eval.stage import run_eval_stage
    from ukmp.io import atomic_write_json, model_digest

    tasks = args.tasks.split(",") if args.tasks else cfg.eval.after_finetune
    model_dir = None if args.model == "dense" else Path(args.model)
    out = Path(args.out) if args.out else Path(cfg.output_dir) / cfg.name / (
        "eval_dense" if model_dir is None else eval_dir_name(model_dir))
    run_eval_stage(cfg, model_dir, tasks, out)  # creates ``out`` once the model has loaded
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["model"] = ({"path": cfg.model.source, "digest": None} if model_dir is None else
                        {"path": str(model_dir.resolve()), "digest": model_digest(model_dir)})
    atomic_write_json(out / "metrics.json", metrics)
    print(json.dumps(metrics, indent=1))
    return 0


def eval_dir_name(model_dir) -> str:
    """``eval_<name>`` for ``ukmp eval --model DIR``: the directory's own name, or, for the pipeline's generic
    ``.../<run>/<stage>/model``, the run and stage (``eval_ukmp_0.5_finetune``), so two models never share one."""
    from pathlib import Path

    p = Path(model_dir).resolve()
    if p.name != "model":
        return f"eval_{p.name}"
    return "eval_" + "_".join(x for x in (p.parent.parent.name, p.parent.name) if x)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ukmp.preflight import Reach

    cfg = _load_cfg(args, lambda c: Reach(finetune=True))
    from ukmp.pipeline import completed_stage, finetune_stage, preflight

    preflight(cfg, Reach(finetune=True))

    root = Path(cfg.output_dir) / cfg.name
    default = root / "prune" / "model"
    pruned = Path(args.pruned) if args.pruned else default
    # with the run's own pruned model, depend on its prune stage exactly as `ukmp run` does
    upstream = completed_stage("prune", root / "prune") if pruned == default else []
    rec = finetune_stage(cfg, root, pruned, upstream, force=args.force_stage)
    print(json.dumps({"finetune_dir": str(rec.path), "skipped": rec.skipped, **rec.info}, indent=1))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    _check_ratio(args.ratio)
    cfg = _load_cfg(args)  # the base config, validated before anything heavy
    from ukmp.preflight import Reach, check_reach

    tasks = args.tasks.split(",") if args.tasks else (cfg.eval.after_finetune if args.recover else cfg.eval.after_prune)
    check_reach(cfg, Reach(prune=True, finetune=args.recover, tasks=(("--tasks" if args.tasks else "eval tasks",
                                                                       tuple(tasks)),)))
    from ukmp.compare import DEFAULT_METHODS, compare

    configs, overrides = _split_config_args(args.config)
    methods = tuple(args.methods.split(",")) if args.methods else DEFAULT_METHODS
    from ukmp.prune.scoring import get_method

    for m in methods:
        get_method(m)
    out = compare(configs, overrides, args.ratio, methods, recover=args.recover,
                  methods_dir=Path(args.methods_dir) if args.methods_dir else None,
                  tasks=args.tasks.split(",") if args.tasks else None)
    print(json.dumps({m: {"achieved_ratio": r["achieved_ratio"], "pruned": r["pruned"]}
                      for m, r in out["methods"].items()}, indent=1))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ukmp.pipeline import run
    from ukmp.config import load_config

    if args.structure_only:
        from ukmp.demo import run_demo

        print(json.dumps(run_demo(args.out, ratio=args.ratio, seed=args.seed), indent=1))
        return 0
    from importlib import resources

    files, overrides = _split_config_args(args.config)
    if files:
        raise ValueError(f"demo takes key=value overrides only, not config files ({files[0]}); use `ukmp run`")
    demo_yaml = str(resources.files("ukmp") / "configs" / "demo.yaml")
    cfg = load_config([demo_yaml], [f"output_dir={args.out}", f"prune.ratio={args.ratio}", f"model.seed={args.seed}",
                                    *overrides])
    out = run(cfg)
    from pathlib import Path  # issue 24 part B: a short human summary instead of the 120-line JSON

    from ukmp.demo import pipeline_summary

    print(pipeline_summary(out, Path(cfg.output_dir) / cfg.name))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ukmp.export import export, format_report

    try:
        report = export(args.model, args.format, args.out, dtype=args.dtype, gguf_arch=args.gguf_arch,
                        pad_multiple=args.pad_multiple, mmproj=args.mmproj)
    except ImportError as e:  # an optional package of the export extra: one line, exit 2 like other bad input
        raise ValueError(str(e)) from None
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


class _ShippedConfigsFormatter(argparse.HelpFormatter):
    """Fills ``{shipped}`` in a help text with the shipped config names when the help is printed: reading them imports
    torch, which parsing and config validation must not (a bad value fails in a fraction of a second)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        if text and "{shipped}" in text:
            from ukmp.models.families import SHIPPED_CONFIGS  # torch-free: --help stays fast

            text = text.replace("{shipped}", ", ".join(SHIPPED_CONFIGS))
        return text


def build_parser() -> argparse.ArgumentParser:
    from ukmp.config import EVAL_TASKS

    p = argparse.ArgumentParser(prog="ukmp", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (sets OMP_NUM_THREADS / MKL_NUM_THREADS and torch.set_num_threads); "
                        "on a machine shared with other jobs use your share of the cores: more threads than free "
                        "cores make every step wait for the slowest thread")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser(
        "inspect", help="unit counts per group kind, parameters per unit, prunable and total parameters",
        description="Report the prunable structure of MODEL without reading any weights (built on the meta device).",
        formatter_class=_ShippedConfigsFormatter,
    )
    s.add_argument("model", help="a hub id (Salesforce/blip2-flan-t5-xl), a local model directory, a pruned model "
                                 "directory, a config .json, or a shipped config: {shipped}")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=_cmd_inspect)

    def config_args(sp):
        sp.add_argument("config", nargs="*", metavar="CONFIG|key=value",
                        help="YAML config files (later ones win; each may list 'defaults:') and dotted overrides, "
                             "e.g. prune.ratio=0.3 finetune.enabled=false; before or after the options")

    s = sub.add_parser("run", help="prune -> eval -> finetune -> eval in one resumable process",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run the whole pipeline: [eval_dense] -> prune -> eval_pruned -> finetune -> "
                                   "eval_finetuned. Each stage writes outputs/<name>/<stage>/ and is skipped when its "
                                   "artifacts exist with the same config hash, so a crashed run resumes. A config file "
                                   "is required (configs/ukmp_0.5.yaml; `ukmp demo` for the tiny demo).\n\n"
                                   "Config keys and defaults:\n  " + "\n  ".join(_config_keys()))
    config_args(s)
    s.add_argument("--force", action="append", choices=STAGE_NAMES, help="re-run this stage even if up to date")
    s.add_argument("--only", action="append", choices=STAGE_NAMES, help="run only these optional stages")
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("prune", help="score units on calibration data and prune (scores, plan, pruned model)",
                       description="The prune stage alone: writes scores.safetensors, plan.json, model/, "
                                   "summary.json and kept_width.png under outputs/<name>/prune/. With --plan (or "
                                   "prune.plan_from=FILE) a plan from `ukmp plan` is applied as is, without scoring; "
                                   "prune.scores_from=FILE re-allocates cached scores with this config.")
    config_args(s)
    s.add_argument("--plan", help="apply this plan.json (e.g. written by `ukmp plan`) instead of scoring")
    s.add_argument("--force-stage", action="store_true", help="re-run even if up to date")
    s.set_defaults(func=_cmd_prune)

    s = sub.add_parser("plan", help="re-allocate from cached scores at another ratio (no model needed)",
                       description="Allocate a new plan from the scores.safetensors of a finished prune stage, at "
                                   "another ratio or normalisation, in seconds and without the model. Apply it with "
                                   "`ukmp prune CONFIG --plan plan.json` (pruned model under outputs/<name>/prune/).")
    s.add_argument("--scores", required=True, help="scores.safetensors written by the prune stage")
    s.add_argument("--ratio", type=float, required=True, help="fraction of all model parameters to remove")
    s.add_argument("--out", default="plan.json", help="where to write the plan (default plan.json)")
    s.add_argument("--normalization", choices=["mean_iterative", "mean_once", "none", "minmax", "standardize"],
                   help="per-modality score normalisation (default: the one the scores were allocated with)")
    s.add_argument("--scope", choices=["global", "local", "uniform"],
                   help="global: one ranking over the whole model; local: every module loses the same fraction; "
                        "uniform: every layer of a kind keeps the same width (default: as the scores file records)")
    s.add_argument("--width-multiple", type=int,
                   help="kept MLP channels per layer: a multiple of this, e.g. 32 or 256 (default: as recorded)")
    s.add_argument("--rank-by", choices=["importance", "per_param"],
                   help="global scope: rank by the normalised score, or by it per parameter the unit frees "
                        "(default: as the scores file records)")
    s.add_argument("--units-per-step", type=int, help="units removed per allocation step (default: as recorded)")
    s.add_argument("--fine-units-per-step", type=int,
                   help="units per step once the target is near (default: as recorded)")
    s.add_argument("--allow-shortfall", action="store_true",
                   help="write the plan even when every group is at its floor before the ratio is reached")
    s.set_defaults(func=_cmd_plan)

    s = sub.add_parser("eval", help="evaluate a dense or pruned model on zero-shot tasks",
                       description="Evaluate model.source (--model dense) or a saved pruned model on zero-shot tasks; "
                                   "writes metrics.json (with the model's path and digest) and <task>/predictions.json"
                                   ". VQA accuracy follows eval.vqa_scorer (lavis | official).")
    config_args(s)
    s.add_argument("--model", default="dense", help="a pruned model directory, or 'dense' (model.source)")
    s.add_argument("--tasks", help=f"comma-separated, from: {','.join(EVAL_TASKS)} (default eval.after_finetune)")
    s.add_argument("--out", help="output directory (default outputs/<name>/eval_<model dir name>; for "
                                 ".../<run>/<stage>/model: eval_<run>_<stage>)")
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("finetune", help="recover a pruned model (WR-LoRA + progressive distillation)",
                       description="The finetune stage alone: WR-LoRA + the 7 sub-stages of progressive distillation "
                                   "from the dense teacher (Table A budget scaled by finetune.sample_scale); writes "
                                   "model/ (merged), loss.png, train_log.json under outputs/<name>/finetune/ and "
                                   "resumes from its last checkpoint.")
    config_args(s)
    s.add_argument("--pruned", help="pruned model directory (default outputs/<name>/prune/model)")
    s.add_argument("--force-stage", action="store_true", help="re-run even if up to date")
    s.set_defaults(func=_cmd_finetune)

    s = sub.add_parser(
        "compare", help="UKMP and the baselines at one ratio: one table (Markdown + JSON) and one chart",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Prune the same model with every method at --ratio, evaluate each (eval.after_prune tasks, or "
                    "eval.after_finetune with --recover), and write <output_dir>/<name>_compare_<ratio>/"
                    "comparison.{md,json,png}.\n\nMethods and their knobs (prune.options.<namespace>):\n"
                    + METHOD_HELP)
    config_args(s)
    s.add_argument("--ratio", type=float, default=0.5, help="fraction of all parameters to remove (default 0.5)")
    s.add_argument("--methods", help="comma-separated subset (default: all)")
    s.add_argument("--recover", action="store_true", help="also recover every pruned model with the same budget")
    s.add_argument("--methods-dir", help="directory of per-method YAML deltas (<method>.yaml), e.g. configs/methods; "
                                         "a delta sits on the first CONFIG, your later files and overrides win")
    s.add_argument("--tasks", help="comma-separated tasks to compare on (default eval.after_prune, with --recover "
                                   "eval.after_finetune), e.g. okvqa,gqa,nocaps,flickr30k")
    s.set_defaults(func=_cmd_compare)

    s = sub.add_parser("demo", help="the whole pipeline on the embedded tiny model and sample data (CPU, ~1 min)",
                       description="eval_dense -> prune -> eval_pruned -> finetune -> eval_finetuned on a tiny random "
                                   "BLIP-2 and generated sample data in the real datasets' formats; writes "
                                   "<out>/demo/results.json. Measured 49 s wall (56 s CPU) on 2 idle cores, 2.5 min "
                                   "with the machine busy (2026-11-29).")
    s.add_argument("--out", default="outputs", help="output root (default: outputs; the run is <out>/demo)")
    s.add_argument("--ratio", type=float, default=0.5, help="fraction of all parameters to remove (default 0.5)")
    s.add_argument("--seed", type=int, default=0, help="seed of the tiny model's random weights (model.seed; "
                                                        "default 0)")
    s.add_argument("config", nargs="*", metavar="key=value", help="config overrides, e.g. eval.vqa_scorer=official")
    s.add_argument("--structure-only", action="store_true",
                   help="only prune with a random plan, save, reload and generate (8.5 s, mostly imports)")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("export", help="write a pruned model for a serving engine (hf, gguf, onnx)",
                       description="Export a pruned model directory for serving: hf (stock transformers checkpoint, "
                                   "every layer zero-padded to the widest kept width; prints how much of the saving "
                                   "that keeps), gguf (llama.cpp), onnx (ONNX Runtime). OUT must not exist.")
    s.add_argument("model", help="a ukmp pruned model directory (plan.json + model.safetensors)")
    s.add_argument("--format", required=True, choices=["hf", "gguf", "onnx"],
                   help="hf: stock transformers checkpoint (Llama, Mistral, Qwen2, LLaVA); gguf: llama.cpp file "
                        "(Llama-family LMs, LLaVA's LM); onnx: full-sequence logits graph (ONNX Runtime)")
    s.add_argument("--out", required=True, help="output path (a directory for hf and onnx, a .gguf file for gguf); "
                                                "must not exist")
    s.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"], help="weight type (default: as stored for hf, "
                                                                           "f32 otherwise)")
    s.add_argument("--gguf-arch", default="deci", choices=["deci", "llama"],
                   help="GGUF architecture: deci (per-layer widths, any plan; default) or llama (uniform plans)")
    s.add_argument("--pad-multiple", type=int, default=0, metavar="N",
                   help="gguf: zero-pad every MLP to a multiple of N channels (the same function; 32 lets q8_0 "
                        "quantise every matrix and llama.cpp use its faster kernels); default 0: no padding")
    s.add_argument("--mmproj", metavar="PATH",
                   help="gguf, LLaVA: also write the vision tower + projector as llama.cpp's mmproj file at PATH "
                        "(the file llama-mtmd-cli --mmproj reads; must not exist)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=_cmd_export)
    return p


METHOD_HELP = """\
  ukmp               selected-token Taylor x angle entropy, per-modality iterative mean normalisation (the method)
  llm_pruner_global  element-wise Taylor (llmp.taylor: param_first|param_second|param_mix|vectorize), one global
                     parameter-budgeted ranking; llmp.imp_normalizer none|param, llmp.skip_edge_layers
  llm_pruner_local   the same scores, every module loses the same fraction (llmp.local_ratio_mode)
  ecoflap_sp         zeroth-order block scores (ecoflap.score zeroth|first|taylor_units, eps, zo_samples),
                     water-filled block ratios (ecoflap.cap_mode), Wanda-sp inside blocks (ecoflap.local_score)
  flap               fluctuation metric at output projections (flap.metric wifv|ifv|wifn), standardised, AL-AM,
                     bias compensation (flap.bias_compensation; T5 o/wo gain a bias recorded in the plan)
  upop               learnable head/channel gates, progressive unified search with weight training
                     (upop.steps, update_every, lr, w_attn, w_mlp, weights full|lora)
  magnitude_sp       data-free weight magnitude (mag.scope group|out_proj, mag.p 1|2), uniform per module
  wanda_sp           |W| x ||X|| (wanda.scope out_proj|group, wanda.sequential)
  random             random units
"""

STAGE_NAMES = ["eval_dense", "prune", "eval_pruned", "finetune", "eval_finetuned"]


def _config_keys() -> list[str]:
    from ukmp.config import describe

    return describe()


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args``, except that CONFIG files and ``key=value`` overrides may also come after the options
    (argparse stops filling a ``nargs='*'`` positional at the first option); they keep their order."""
    args, extras = parser.parse_known_args(argv)
    if extras and hasattr(args, "config") and not any(e.startswith("-") for e in extras):
        args.config = [*(args.config or []), *extras]
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.threads is not None:
        if args.threads < 1:
            print(f"ukmp: error: --threads: must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        set_threads(args.threads)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"ukmp {args.command}: interrupted (nothing half-written is kept; re-run to resume)", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError) as e:  # OSError: also a stage locked by another run
        print(f"ukmp {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def set_threads(n: int) -> None:
    """``n`` CPU threads for torch and the BLAS libraries: the variables for a torch not imported yet, the call for
    one that is."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def _one_line(e: BaseException) -> str:
    """The first line of an error's message; for an OS error, the file and the reason."""
    if isinstance(e, OSError) and getattr(e, "filename", None) and e.strerror:
        return f"{e.filename}: {e.strerror}"
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


if __name__ == "__main__":
    raise SystemExit(main())
