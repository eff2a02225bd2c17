"""Shared pieces of the ukmp benchmark scripts (not part of the library, not part of the test suite).

* device / config defaults: CUDA -> the full-size ``blip2-flan-t5-xl`` config in bf16, CPU -> the 127M ``mid`` config
  in fp32, both with random weights (no checkpoint, no hub);
* synthetic calibration data: random images and short captions fed through the same ``PrefixLMCollator`` that
  ``ukmp.prune.stage.calibration_batches`` uses, so batches have the real layout (query tokens, prefix, targets);
* measurement helpers: wall-clock timers that synchronise CUDA, a peak-memory probe (CUDA allocator statistics, or
  a sampled process RSS on CPU), the machine description, table printing and atomic JSON / PNG output.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
GIB = float(1 << 30)
MIB = float(1 << 20)
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM, bf16 dense tensor-core peak (no sparsity)

WORDS = ("a photo of a cat sitting on a red couch next to a dog running across the green grass in a park two "
         "people riding bicycles down a city street plate of food with broccoli and rice man holding an umbrella "
         "in the rain blue circle yellow triangle train on the tracks near station bowl of fruit wooden table "
         "child playing with ball beach sky is water calm black white old building").split()


# ---------------------------------------------------------------------------------------------------- arguments
def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: cuda when available)")
    p.add_argument("--config", default=None,
                   help="shipped model config: mid | blip2-flan-t5-xl | tiny (default: blip2-flan-t5-xl on CUDA, "
                        "mid on CPU)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results directory (default: benchmarks/results)")
    return p


@dataclass(frozen=True)
class Setup:
    device: torch.device
    config: str
    dtype: torch.dtype
    out_dir: Path

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def resolve_setup(args: argparse.Namespace) -> Setup:
    from ukmp.models.build import parse_dtype

    if args.threads:
        torch.set_num_threads(int(args.threads))
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device: {args.device!r} requested but CUDA is not available")
    config = args.config or ("blip2-flan-t5-xl" if device.type == "cuda" else "mid")
    dtype = parse_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    out = Path(args.out) if args.out else RESULTS_DIR
    return Setup(device, config, dtype, out)


# ---------------------------------------------------------------------------------------------------- models
def load_bench_model(setup: Setup, seed: int = 0):
    """(random-weight dense model on the device, processor) with the processor's ``<image>`` id in the config."""
    from ukmp.models.build import build_processor, build_tokenizer, load_model

    torch.manual_seed(seed)
    model = load_model(setup.config, dtype=setup.dtype, random_weights_device=str(setup.device))
    cfg = model.config
    processor = build_processor(build_tokenizer(), cfg.num_query_tokens, cfg.vision_config.image_size)
    cfg.image_token_index = int(processor.tokenizer.convert_tokens_to_ids("<image>"))
    return model.eval(), processor


def magnitude_plan(model, ratio: float, scope: str = "global"):
    """A quick UKMP-shaped plan: data-free magnitude scores through the UKMP allocator (global, modality-normalised).

    Only the shapes matter for speed; the plan is not a UKMP-quality plan. On random weights the global magnitude
    ranking removes heads far more than MLP channels; ``scope="local"`` removes the same share of every group.
    """
    from ukmp.config import PruneConfig
    from ukmp.models import adapter_for
    from ukmp.models.blip2 import count_parameters
    from ukmp.prune.allocate import AllocationConfig, allocate
    from ukmp.prune.scoring import score_magnitude

    groups = adapter_for(model).groups()
    result = score_magnitude(model, groups, lambda epoch: iter(()), PruneConfig(), 0)
    return allocate(result.scores, groups, count_parameters(model), AllocationConfig(target_ratio=ratio, scope=scope))


# ---------------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class _Caption:
    id: str
    caption: str


class SyntheticCaptions:
    """``n`` random RGB images (noise, ``size`` px) with 6-14 word captions; deterministic in ``seed``."""

    def __init__(self, n: int, size: int, seed: int = 0):
        rng = random.Random(seed)
        self.size, self.seed = size, seed
        self.records = [_Caption(f"synthetic-{i}", " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))))
                        for i in range(n)]

    def __len__(self) -> int:
        return len(self.records)

    def open_image(self, i: int) -> Image.Image:
        rng = np.random.default_rng(self.seed * 100_003 + i)
        return Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8), "RGB")


def calibration_collator(model, processor, n: int, seed: int = 0, max_text_tokens: int = 32, augment: bool = True):
    """A ``PrefixLMCollator`` over ``n`` synthetic samples (the calibration settings of ``calibration_batches``)."""
    from ukmp.data.batches import PrefixLMCollator

    size = model.config.vision_config.image_size
    ds = SyntheticCaptions(n, size=size + size // 4, seed=seed)
    return PrefixLMCollator(ds, processor, size, max_text_tokens, augment, seed,
                            num_query_tokens=model.config.num_query_tokens)


def make_batches(collate, n: int, batch_size: int, group_by_length: bool = False,
                 epoch: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches of sample indices 0..n-1 (built once, kept on the CPU): consecutive, or grouped by text length as
    ``calibration_batches`` does (``prune.group_by_length``, the default there)."""
    from ukmp.data.batches import calibration_chunks

    return [collate(c, epoch) for c in calibration_chunks(range(n), batch_size, collate, epoch, group_by_length)]


def generation_inputs(model, processor, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor output for ``batch`` random images with short prompts (image tokens prepended)."""
    size = model.config.vision_config.image_size
    ds = SyntheticCaptions(batch, size=size, seed=seed)
    prompts = [" ".join(r.caption.split()[:4]) for r in ds.records]
    enc = processor(images=[ds.open_image(i) for i in range(batch)], text=prompts, return_tensors="pt", padding=True)
    return {k: enc[k] for k in ("pixel_values", "input_ids", "attention_mask")}


def to_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss() -> int:
    """Peak resident set size of this process over its lifetime (``resource.getrusage``; Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakMemory:
    """Peak memory of a code region.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (exact, allocator bytes). CPU: the process RSS sampled
    every ``interval`` s by a thread (torch releases the GIL inside kernels), minus the RSS at entry; a sampled peak
    can miss spikes shorter than the interval, so it is a lower bound.
    """

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval = device, interval
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            self.baseline = self.peak = current_rss()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, current_rss())

    @property
    def delta(self) -> int:
        return self.peak - self.baseline

    def to_dict(self) -> dict[str, Any]:
        kind = "cuda_max_memory_allocated" if self.device.type == "cuda" else "sampled_rss"
        return {"kind": kind, "peak_bytes": self.peak, "baseline_bytes": self.baseline, "delta_bytes": self.delta}


# ---------------------------------------------------------------------------------------------------- reporting
def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info: dict[str, Any] = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_model": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / GIB, 1)
    return info


def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3e}"
        return f"{v:.3f}"
    return str(v)


def print_missing(missing: list[str]) -> None:
    if missing:
        print("\nMissing figures (not measured in this run):")
        for m in missing:
            print(f"  - {m}")
    else:
        print("\nAll figures of this benchmark were measured in this run.")


def finish(setup, name: str, res: dict[str, Any], missing: list[str], figure) -> int:
    """The common tail of every benchmark: record the end load, list what was not measured, save JSON + PNG."""
    res["missing"] = missing
    res["machine"]["load_average_at_end"] = list(os.getloadavg())
    print_missing(missing)
    save_results(setup.out_dir, name, res, figure(res))
    return 0


def save_results(out_dir: Path, name: str, payload: dict[str, Any], fig) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` and ``<name>.png`` atomically; returns both paths."""
    import matplotlib.pyplot as plt

    from ukmp.io import atomic_write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, ppath = out_dir / f"{name}.json", out_dir / f"{name}.png"
    atomic_write_json(jpath, payload)
    tmp = ppath.with_name(f".{ppath.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, ppath)
    print(f"\nwrote {jpath}\nwrote {ppath}")
    return jpath, ppath


def new_figure(ncols: int, width: float = 5.0, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height))
    return fig, (list(axes) if ncols > 1 else [axes])
