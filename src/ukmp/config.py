"""Typed run configuration: dataclass schemas, YAML chains with ``defaults:``, ``key=value`` overrides.

Unknown keys fail with a one-line error naming the key and the file. A config file may start with
``defaults: [base.yaml, ...]`` (paths relative to the file); later files and then command-line overrides win.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ukmp.layer_ranges import check_layers
from ukmp.method_traits import method_traits


class ConfigError(ValueError):
    """A bad config value or key; the message is one line naming it."""


@dataclass
class ModelConfig:
    source: str = "tiny"  # hub id, local dir, config .json, or a shipped name (`ukmp inspect --help` lists them)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    attn_implementation: str = "sdpa"  # sdpa | eager
    seed: int = 0  # weights seed for config-only sources
    gguf_file: str = ""  # a GGUF file inside `source` (a local directory), read by transformers' GGUF loader


@dataclass
class DataConfig:
    calibration: str = "sample:cc595k"  # dataset YAML, or sample:<name> for the generated sample data
    finetune: str = "sample:cc595k"
    image_size: int = 0  # 0: the model's image size
    max_text_tokens: int = 32
    augment: bool = True  # RandomResizedCrop(0.5, 1) + horizontal flip, as the reference does for calibration
    calibration_text: str = ""  # a text dataset YAML mixed into a VLM's calibration (its language model alone)


@dataclass
class PruneConfig:
    method: str = "ukmp"  # ukmp | random | magnitude (baselines register more)
    ratio: float = 0.5  # fraction of ALL model parameters to remove
    num_samples: int = 1000
    num_text_samples: int = 0  # windows of data.calibration_text besides num_samples (0: as many as num_samples)
    batch_size: int = 8
    threshold: float = 0.4  # token-selection T; 1.0 selects every token
    taylor: str = "first"  # first | first_no_threshold | second | mix
    entropy: str = "cosine"  # cosine | arccos | none
    normalization: str = "mean_iterative"  # mean_iterative | mean_once | none | minmax | standardize
    scope: str = "global"  # global | local | uniform (every layer of a kind keeps the same width; prune/widths.py)
    units_per_step: int = 1000
    fine_units_per_step: int = 100
    max_group_prune_ratio: float = 0.9
    local_rounding: str = "carry"  # scope=local: floor (P1 as written) | carry (hits the ratio) | llm_pruner
    exact_stop: bool = False  # scope=global: never overshoot (skip a unit that would); else the last unit may
    budget: str = "params"  # what prune.ratio counts: params (of the whole model) | units (LLM-Pruner: each unit is 1)
    layers: dict[str, str] = field(default_factory=dict)  # per tower: "all" | "start:stop[:step]"; {} = every layer
    max_overshoot: float = 0.005  # an achieved ratio above target + max(largest unit, this) is an error
    width_multiple: int = 1  # kept MLP/FFN channels per layer: a multiple of this (32, 256) or all; heads untouched
    entropy_exclude_padding: bool = True  # padded positions stay out of the histograms (as at batch size 1)
    group_by_length: bool = True  # calibration batches of similar text length (less padding; the sums are unchanged)
    prefetch: int = 2  # calibration batches collated ahead in a background thread (0: inline)
    compute_dtype: str = ""  # '' = the model's dtype; bfloat16 | float16: autocast matmuls, fp32 accumulators
    fused_passes: bool = False  # one forward feeds both passes (the reference uses separate, differently augmented ones)
    accumulate_on: str = "device"  # UKMP's fp32 Taylor accumulators: device (fastest) | cpu (host memory, pinned)
    score_passes: int = 1  # k > 1: k passes over the calibration data, each accumulating 1/k of the groups
    drop_unused_layers: bool = True  # drop layers whose output never reaches the output (LLaVA's last ViT layer)
    scores_from: str = ""  # reuse scores.safetensors of an earlier prune stage; allocation from this config
    allow_shortfall: bool = False  # accept a plan below the target ratio (every group at its floor) instead of failing
    plan_from: str = ""  # apply this plan.json as is (e.g. from `ukmp plan`): no scoring, no allocation
    options: dict[str, Any] = field(default_factory=dict)  # per-method knobs, e.g. {flap: {metric: wifv}}
    iterations: int = 1  # k > 1: k rounds of score -> remove 1/k of the target -> re-score the pruned model
    rank_by: str = "importance"  # importance | per_param (scope=global: normalised score / parameters the unit frees)


@dataclass
class FinetuneConfig:
    enabled: bool = True
    adapter: str = "wr_lora"  # wr_lora | lora
    r: int = 8
    r_recall: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    schedule: str = "progressive"  # progressive | mse_kl_task_all | kl_task | task | no_progressive
    sample_scale: float = 1.0  # multiplies Table A's sample counts (small runs)
    batch_size: int = 20
    grad_accum: int = 1
    lr: float = 2e-5
    warmup_steps: int = 50
    lr_schedule: str = "constant"  # constant | cosine
    weight_decay: float = 0.05
    mixed_precision: str = "no"  # no | bf16
    checkpoint_every: int = 500
    max_steps_per_stage: int = 0  # 0: no cap
    final_stage_samples: int = 0  # sub-stage 7 (CE + KL): 0 = the rest of the data, as the reference


@dataclass
class EvalConfig:
    after_prune: list[str] = field(default_factory=lambda: ["okvqa", "gqa"])
    after_finetune: list[str] = field(default_factory=lambda: ["okvqa", "gqa", "nocaps", "flickr30k", "vqav2"])
    dense: bool = False
    datasets: dict[str, str] = field(default_factory=dict)  # task -> dataset YAML (default: sample:<task>)
    batch_size: int = 16
    max_samples: int = 0  # 0: all
    num_beams: int = 5
    retrieval_model: str = "auto"  # auto: Salesforce/blip2-itm-vit-g (a tiny random one for source=tiny)
    vqa_scorer: str = "lavis"  # lavis (LAVIS's evaluator copy, the paper's numbers) | official (GT-Vision-Lab today)


@dataclass
class RunConfig:
    name: str = "demo"
    output_dir: str = "outputs"
    seed: int = 42
    tiny: bool = False  # true: model.source -> its family's tiny build, every dataset -> the sample data (tiny.yaml)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, Any]]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'defaults'")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        node = OmegaConf.load(path)
    except (OmegaConfBaseException, ValueError) as e:  # yaml errors subclass ValueError in some versions
        raise ConfigError(f"{path}: cannot parse YAML ({str(e).splitlines()[0]})") from None
    except Exception as e:  # noqa: BLE001 - yaml.YAMLError
        raise ConfigError(f"{path}: cannot parse YAML ({str(e).splitlines()[0]})") from None
    if not OmegaConf.is_dict(node):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got a {type(node).__name__}")
    chain: list[tuple[Path, Any]] = []
    defaults = node.pop("defaults", [])
    for d in defaults or []:
        chain += _read_yaml_chain(path.parent / str(d), seen + (path,))
    chain.append((path, node))
    return chain


def load_config(paths: list[str | Path] | str | Path | None = None, overrides: list[str] | None = None,
                schema: type = RunConfig):
    """Merge YAML files (each with optional ``defaults:``) and ``a.b=value`` overrides onto ``schema``."""
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    merged = OmegaConf.structured(schema)
    for p in paths:
        for src, node in _read_yaml_chain(Path(p)):
            try:
                merged = OmegaConf.merge(merged, node)
            except (ConfigKeyError, ValidationError, OmegaConfBaseException) as e:
                key = getattr(e, "full_key", None) or getattr(e, "key", None) or ""
                raise ConfigError(f"{src}: bad key or value {key!r} ({str(e).splitlines()[0]})") from None
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key=value")
        key, value = ov.split("=", 1)
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([f"{key}={value}"]))
        except (ConfigKeyError, ValidationError, OmegaConfBaseException) as e:
            raise ConfigError(f"override {key!r}: {str(e).splitlines()[0]}") from None
    cfg = OmegaConf.to_object(merged)
    unboolean_choices(cfg)
    if cfg.tiny:
        apply_tiny(cfg)
    validate(cfg)
    return cfg


_CHOICES = {
    ("model", "dtype"): ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
    ("model", "attn_implementation"): ("sdpa", "eager"),
    ("prune", "taylor"): ("first", "first_no_threshold", "second", "mix"),
    ("prune", "entropy"): ("cosine", "arccos", "none"),
    ("prune", "normalization"): ("mean_iterative", "mean_once", "none", "minmax", "standardize"),
    ("prune", "scope"): ("global", "local", "uniform"),
    ("prune", "local_rounding"): ("floor", "carry", "llm_pruner"),
    ("prune", "budget"): ("params", "units"),
    ("prune", "compute_dtype"): ("", "model", "bfloat16", "float16", "bf16", "fp16"),
    ("prune", "accumulate_on"): ("device", "cpu"),
    ("prune", "rank_by"): ("importance", "per_param"),
    ("finetune", "adapter"): ("wr_lora", "lora"),
    ("finetune", "schedule"): ("progressive", "mse_kl_task_all", "kl_task", "task", "no_progressive"),
    ("finetune", "lr_schedule"): ("constant", "cosine"),
    ("finetune", "mixed_precision"): ("no", "bf16"),
    ("eval", "vqa_scorer"): ("lavis", "official"),
}


# Names other modules own, repeated here so that a config is checked without importing torch (tests tie each list
# to its source: ukmp.eval.stage.TASKS (name -> kind) and the baselines' read_options namespaces).
EVAL_TASK_KINDS = {"okvqa": "vqa", "vqav2": "vqa", "gqa": "gqa", "nocaps": "caption", "coco_caption": "caption",
                   "flickr30k": "retrieval", "perplexity": "perplexity"}
EVAL_TASKS = tuple(EVAL_TASK_KINDS)
OPTION_NAMESPACES = ("ecoflap", "flap", "llmp", "mag", "upop", "wanda")
_DEVICE = re.compile(r"(auto|cpu|cuda|cuda:\d+|mps)")


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: must be {rule}, got {value!r}")


def validate(cfg: RunConfig) -> None:
    """Every value checked before any work, each error one line under the key the user wrote."""
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{section}.{key}: {value!r} is not one of {', '.join(choices)}")
    name = Path(cfg.name)
    _check(bool(cfg.name) and not name.is_absolute() and ".." not in name.parts and cfg.name.strip("./") != "",
           "name", "a relative name inside output_dir (no '..', not absolute)", cfg.name)
    _check(bool(cfg.model.source), "model.source", "a model id, directory or config", cfg.model.source)
    device = cfg.model.device
    _check(bool(_DEVICE.fullmatch(device)), "model.device", "auto, cpu, cuda, cuda:N or mps", device)
    if device.startswith("cuda"):
        import torch  # only when CUDA is asked for

        if not torch.cuda.is_available():
            raise ConfigError(f"model.device: {device!r} requested but CUDA is not available (use auto or cpu)")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"model.device: {device!r} but only {torch.cuda.device_count()} CUDA device(s)")
    p, f, d, e = cfg.prune, cfg.finetune, cfg.data, cfg.eval
    _check(d.image_size >= 0, "data.image_size", ">= 1 (or 0: the model's size)", d.image_size)
    _check(d.max_text_tokens >= 1, "data.max_text_tokens", ">= 1", d.max_text_tokens)
    _check(0.0 <= p.ratio < 1.0, "prune.ratio", "in [0, 1)", p.ratio)
    _check(0.0 < p.threshold <= 1.0, "prune.threshold", "in (0, 1]", p.threshold)
    _check(0.0 < p.max_group_prune_ratio <= 1.0, "prune.max_group_prune_ratio", "in (0, 1]", p.max_group_prune_ratio)
    _check(p.prefetch >= 0, "prune.prefetch", ">= 0", p.prefetch)
    _check(p.score_passes >= 1, "prune.score_passes", ">= 1", p.score_passes)
    _check(p.num_text_samples >= 0, "prune.num_text_samples", ">= 0", p.num_text_samples)
    _check(p.width_multiple >= 1, "prune.width_multiple", ">= 1 (1: any width)", p.width_multiple)
    if p.plan_from and (p.width_multiple > 1 or p.scope == "uniform"):
        raise ConfigError("prune.plan_from: a given plan is applied as is; prune.width_multiple and "
                          "prune.scope=uniform shape a new allocation (give them to `ukmp plan`, or drop them)")
    _check(0.0 <= p.max_overshoot < 1.0, "prune.max_overshoot", "in [0, 1)", p.max_overshoot)
    _check_iterations(p)
    _check(p.rank_by == "importance" or p.scope == "global", "prune.rank_by",
           "'importance' with scope=local (within a group every unit frees the same parameters)", p.rank_by)
    try:
        check_layers(p.layers)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    bad_ns = sorted(set(p.options) - set(OPTION_NAMESPACES))
    if bad_ns:
        raise ConfigError(f"prune.options.{bad_ns[0]}: unknown namespace (known: {', '.join(OPTION_NAMESPACES)})")
    for ns, knobs in p.options.items():
        _check(knobs is None or isinstance(knobs, dict), f"prune.options.{ns}", "a mapping of knobs", knobs)
    if p.layers and ((p.options.get("llmp") or {}).get("skip_edge_layers")):
        raise ConfigError("prune.options.llmp.skip_edge_layers: a shorthand for prune.layers; give one of the two")
    _check(f.lr > 0, "finetune.lr", "> 0", f.lr)
    _check(f.alpha > 0, "finetune.alpha", "> 0", f.alpha)
    _check(0.0 <= f.dropout < 1.0, "finetune.dropout", "in [0, 1)", f.dropout)
    _check(f.sample_scale > 0, "finetune.sample_scale", "> 0", f.sample_scale)
    _check(f.weight_decay >= 0, "finetune.weight_decay", ">= 0", f.weight_decay)
    for key, value in (("prune.num_samples", p.num_samples), ("prune.batch_size", p.batch_size),
                       ("prune.units_per_step", p.units_per_step),
                       ("prune.fine_units_per_step", p.fine_units_per_step),
                       ("finetune.batch_size", f.batch_size), ("finetune.r", f.r), ("finetune.r_recall", f.r_recall),
                       ("finetune.grad_accum", f.grad_accum), ("finetune.checkpoint_every", f.checkpoint_every),
                       ("eval.batch_size", e.batch_size), ("eval.num_beams", e.num_beams)):
        _check(value >= 1, key, ">= 1", value)
    for key, value in (("finetune.warmup_steps", f.warmup_steps), ("finetune.max_steps_per_stage",
                       f.max_steps_per_stage), ("finetune.final_stage_samples", f.final_stage_samples),
                       ("eval.max_samples", e.max_samples)):
        _check(value >= 0, key, ">= 0", value)
    for key, tasks in (("eval.datasets", list(e.datasets)), ("eval.after_prune", e.after_prune),
                       ("eval.after_finetune", e.after_finetune)):
        unknown = [t for t in tasks if t not in EVAL_TASKS]
        if unknown:
            raise ConfigError(f"{key}: unknown task {unknown[0]!r} (choose from {', '.join(EVAL_TASKS)})")


def _check_iterations(p: PruneConfig) -> None:
    """``prune.iterations``: rounds re-score the model pruned so far, so they need a method that scores (not one that
    makes its own plan) and a stage that scores (not cached scores or a given plan)."""
    _check(isinstance(p.iterations, int) and not isinstance(p.iterations, bool) and p.iterations >= 1,
           "prune.iterations", "an integer >= 1", p.iterations)
    if p.iterations == 1:
        return
    wanda = p.options.get("wanda") or {}
    # a method with its own plan bypasses the shared allocator the rounds re-allocate with (wanda_sp: unless scored
    # at once and floor-rounded); a plugin unknown to ukmp.method_traits is refused by the stage after round 1
    own = method_traits(p.method).plan == "own" or (p.method == "wanda_sp" and (
        wanda.get("sequential", True) or wanda.get("local_rounding") == "carry"))
    for bad, why in ((own, f"{p.method} makes its own plan; rounds re-allocate with the shared allocator"),
                     (bool(p.scores_from), "prune.scores_from holds scores of one model; each round re-scores"),
                     (bool(p.plan_from), "prune.plan_from applies a plan as is"),
                     (p.width_multiple > 1 or p.scope == "uniform",
                      "prune.width_multiple / scope uniform allocate blocks of units, which a round cannot extend")):
        if bad:
            raise ConfigError(f"prune.iterations: {p.iterations} rounds, but {why} (use prune.iterations=1)")


# Knobs that change how a stage runs but never what it produces (prune.prefetch only moves collation into a
# background thread). They stay out of the stage hashes, so changing one re-runs nothing. A knob belongs here only
# with a test that the artifacts are identical with and without it.
EXECUTION_ONLY: dict[str, tuple[str, ...]] = {"prune": ("prefetch",)}
# Fields added after stage caches existed: hashed only when set away from their default, so that a run which
# does not use them keeps the stage hashes (and the finished stages) it had before they were added.
LATE_FIELDS: dict[str, tuple[str, ...]] = {"data": ("calibration_text",),
                                           "prune": ("num_text_samples", "budget", "layers", "max_overshoot",
                                                     "width_multiple", "iterations", "rank_by")}


def hashed_section(name: str, section: Any) -> dict[str, Any]:
    """``asdict(section)`` without the execution-only knobs of ``EXECUTION_ONLY[name]`` and the ``LATE_FIELDS`` at
    their defaults, for a stage hash."""
    d = asdict(section)
    for key in EXECUTION_ONLY.get(name, ()):
        d.pop(key, None)
    defaults = type(section)()
    for key in LATE_FIELDS.get(name, ()):
        if key in d and d[key] == getattr(defaults, key):
            d.pop(key)
    return d


def section_hash(*parts: Any) -> str:
    """Stable hash of config sections (dataclasses or plain data) for stage skipping."""
    def plain(x):
        return asdict(x) if is_dataclass(x) else x

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def describe(schema: type = RunConfig, prefix: str = "") -> list[str]:
    """``key = default`` lines for ``--help``."""
    lines = []
    inst = schema()
    for f in fields(schema):
        v = getattr(inst, f.name)
        if is_dataclass(v):
            lines += describe(type(v), prefix + f.name + ".")
        else:
            lines.append(f"{prefix}{f.name} = {v!r}")
    return lines


# ------------------------------------------------------------------------ YAML 1.1 booleans and the tiny overlay
_YAML_BOOLS = {"True": ("y", "yes", "true", "on"), "False": ("n", "no", "false", "off")}


def unboolean_choices(cfg: RunConfig) -> None:
    """YAML 1.1 reads ``no`` / ``yes`` / ``on`` / ``off`` as booleans, which a string field then holds as 'False' /
    'True': such a value becomes the one choice of its key that YAML read that way (``finetune.mixed_precision=no``)."""
    for (section, key), choices in _CHOICES.items():
        obj = getattr(cfg, section)
        words = _YAML_BOOLS.get(getattr(obj, key), ())
        matches = [c for c in choices if c.lower() in words]
        if len(matches) == 1:
            setattr(obj, key, matches[0])


def sample_spec(spec: str, key: str) -> str:
    """The generated sample dataset (``sample:<format>``) of a dataset YAML's format, for the tiny overlay."""
    from ukmp.data.config import FORMAT_KINDS, load_dataset_config

    if not spec or spec.startswith("sample:"):
        return spec
    try:
        fmt = load_dataset_config(spec).format
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None
    if fmt not in FORMAT_KINDS:
        raise ConfigError(f"{key}: {spec} has format {fmt!r}, which has no sample data for tiny: true")
    return f"sample:{fmt}"


def apply_tiny(cfg: RunConfig) -> None:
    """``tiny: true`` (configs/tiny.yaml): ``model.source`` becomes its family's tiny build and every dataset the
    generated sample data of its format, so any config runs offline in seconds."""
    from ukmp.models.families import TINY, tiny_source

    tiny = tiny_source(cfg.model.source)
    if tiny is None:
        raise ConfigError(f"tiny: no tiny build is known for model.source={cfg.model.source!r} (its family is not "
                          f"known offline); name one with model.source=<{'|'.join(TINY)}>")
    cfg.model.source, cfg.model.gguf_file = tiny, ""
    d = cfg.data
    d.calibration = sample_spec(d.calibration, "data.calibration")
    d.finetune = sample_spec(d.finetune, "data.finetune")
    d.calibration_text = sample_spec(d.calibration_text, "data.calibration_text")
    cfg.eval.datasets = {t: sample_spec(s, f"eval.datasets.{t}") for t, s in cfg.eval.datasets.items()}
