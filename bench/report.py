"""Results -> a markdown table with ratios to the Hugging Face contenders."""
from __future__ import annotations

from pathlib import Path


def _row(r: dict, hf: dict | None, best_hf: dict | None) -> str:
    if "error" in r:
        return f"| {r['mode']} | {r['contender']} | - | failed: {(r['error'].strip().splitlines() or ['?'])[-1][:80]} |" + " |" * 9
    speed = r["tokens_per_s"]
    vs_hf = f"{speed / hf['tokens_per_s']:.2f}x" if hf else "-"
    vs_best = f"{speed / best_hf['tokens_per_s']:.2f}x" if best_hf else "-"
    mem = f"{r['peak_memory_mb'] / hf['peak_memory_mb']:.2f}x" if hf else "-"
    rounds = " / ".join(f"{x['tokens_per_s']:.0f}" for x in r.get("rounds", [])) or "-"
    return (f"| {r['mode']} | {r['contender']} | {r.get('precision', '?')} | {speed:.0f} | {rounds} | {vs_hf} | {vs_best} | {r['peak_memory_mb']:.0f} "
            f"| {mem} | {r['startup_s']:.1f} | {r['final_loss']:.3f} | {100 * r.get('ceiling_fraction', 0):.0f}% |")


def markdown(res: dict) -> str:
    m = res["machine"]
    isa = ", ".join(m.get("isa", [])) or "-"
    lines = [f"Machine: {m['name']} ({m.get('cpu_model', m['processor'])}, {m['cpus']} CPUs, ISA {isa}, torch {m['torch']}, "
             f"native bf16: {m['native_bf16']}"
             f"{'; precision auto forced to ' + m['auto_precision_forced'] if m.get('auto_precision_forced') else ''}"
             f"{'; ISA limited by ' + ', '.join(f'{k}={v}' for k, v in m['isa_limits'].items()) if m.get('isa_limits') else ''}); model {res.get('model', 'smollm2-135m')}; plan `{res['plan']}`, {res['date']}; "
             f"command `{res['command']}`; {res['bench_seconds'] / 60:.1f} min.", "",
             "| mode | contender | precision | real tokens/s (median) | per round | vs HF Trainer | vs faster HF path | peak memory MB "
             "| memory vs HF | start-up s | loss (last 3 steps) | of matmul ceiling |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode in dict.fromkeys(r["mode"] for r in res["contenders"]):
        rows = [r for r in res["contenders"] if r["mode"] == mode]
        ok = {r["contender"]: r for r in rows if "error" not in r}
        hf = ok.get("hf")
        hfs = [ok[k] for k in ("hf", "trl") if k in ok]
        best = max(hfs, key=lambda r: r["tokens_per_s"]) if hfs else None
        lines += [_row(r, hf, best) for r in rows]
    n = max((len(r.get("rounds", [])) for r in res["contenders"]), default=0)
    if n > 1:
        lines += ["", f"Each contender ran {n} times per mode, in the order hf, trl, tunelab and then reversed, so "
                      "that the shared machine's drifting speed favours no one; tokens/s is the median over all "
                      "timed steps of all rounds, peak memory the highest round."]
    c = res["ceiling"]
    lines += ["", f"Matmul ceiling on the model's GEMM shapes: fp32 {c['fp32_gflops']:.0f} GFLOP/s, "
                  f"bf16 {c['bf16_gflops']:.0f} GFLOP/s (the fraction uses the precision each contender ran in)."]
    mfu = [f"{r['contender']} {r['mode']} {100 * r['mfu']:.0f}%" for r in res["contenders"] if "mfu" in r]
    if mfu:
        lines += ["", f"MFU (achieved FLOP/s over the GPU's nominal dense bf16 peak, {res['peak_bf16_tflops']:.0f} "
                      f"TFLOP/s; {res['model_params'] / 1e6:.0f}M parameters): " + ", ".join(mfu) + "."]
    p = res.get("profile", {})
    if "by_category_pct" in p:
        lines += ["", f"Profile of one tunelab LoRA step ({p.get('precision', 'fp32')}, the real training step; "
                      f"{p['step_ms']:.0f} ms self CPU time):", "",
                  "| where | share |", "|---|---|"]
        lines += [f"| {k} | {v}% |" for k, v in p["by_category_pct"].items()]
    e = res.get("eval_speed", {})
    if "speedup" in e:
        lines += ["", f"Evaluation by generation (16 prompts, 48 new tokens): batched with KV cache "
                      f"{e['batched_kv_cache_examples_per_s']:.2f} examples/s, one-by-one "
                      f"{e['one_by_one_examples_per_s']:.2f} examples/s ({e['speedup']:.1f}x)."]
    s = res["startup"]
    lines += ["", f"Start-up: `tunelab --help` {s['tunelab_help_s']:.2f} s; "
                  f"{'model load' if res.get('plan', '').startswith('gpu') else 'built-in model load from cache'} "
                  f"{s['builtin_model_load_s']:.1f} s."]
    return "\n".join(lines) + "\n"


def write_docs(md: str, path: Path, section: str = "bench") -> None:
    """Replace one measured section of docs/results/performance.md (between its markers: "bench"
    for the CPU plans, "bench-gpu" for the GPU ones); a missing section is appended."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    text = path.read_text() if path.exists() else "# Performance\n"
    if start not in text:
        text = text.rstrip("\n") + f"\n\n{start}\n{end}\n"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{md}{end}{tail}")
