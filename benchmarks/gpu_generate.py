"""One-shot end-to-end benchmark of ``purekv_jax.generate`` on a long video prompt: full cache vs PureKV
vs ST-SpAttn vs the paper's CLIE, side by side in one run (random weights; not a test).

Model: a Qwen2.5-VL-7B-shaped text stack with fewer layers (hidden 3584, 28 q / 4 KV heads, head_dim 128,
intermediate 18944, M-RoPE (16, 24, 24); ``--layers`` 8 by default, vocab 32k), random bf16 weights, and
the tiny random vision tower of ``tiny_config`` (hidden 32, depth 2) projecting to 3584: the cheapest
tower that still puts a real video (``pixel_values_videos`` + ``video_grid_thw``) in the prompt, so the
prefill runs the whole multimodal path (vision tower, merge, M-RoPE, decoder, pruning) and ST-SpAttn
sees a video layout. Prompt (batch 1): ``--text-before`` random text tokens (the "system prompt"),
``<|vision_start|>``, one video of t x 24 x 24 merged tokens (t chosen for each target length),
``<|vision_end|>``, and a question of >= ``--text-after`` tokens padded so that the prompt length is a
multiple of 64 (no padding inside ``generate``).

Rows, per prompt length (every row calls ``generate`` itself; nothing is re-implemented):

* ``full``: ``policy=None``, the library's default prefill attention (``"auto"``: flash-style above 512
  tokens), the baseline of the speed-up columns;
* ``purekv``: ``PureKVConfig(budget=0.2)`` (the default policy);
* ``st-<backend>``: ``PureKVConfig(budget=0.2, st_sparse=True, st_backend=<backend>)`` (union heads,
  block-sparse in layers >= st_start = 3; triton and mosaic_gpu on the GPU, xla on ``--smoke``);
* ``paper``: ``PureKVConfig.paper(0.2)`` (single-anchor CLIE);
* reference rows ``full-sdpa`` and ``st-<backend>-sdpa``: the same as ``full`` / ``st-<backend>`` but with
  ``generate(attention=sdpa)``, a callable running ``jax.nn.dot_product_attention(is_causal=True)``
  (cuDNN on the GPU) in the dense layers: how the speed-ups look against a vendor dense attention
  instead of the library's own flash path. Valid only because the prompt holds no padding (checked).

Columns: prefill seconds (median of up to ``--reps`` runs after a first, warm-up run; compile is never
included: ``generate`` compiles ahead of time and reports it apart), decode ms per token
(``decode_s / decode_steps``, ``--new`` tokens, EOS off), compile seconds, prompt KV MiB kept vs full and
the ratio, XLA's peak prefill memory (``stats["prefill_peak_bytes"]``: arguments incl. weights + outputs
+ temporaries), and speed-ups vs ``full``.

Fail-soft: a row that raises (OOM, lowering error) records the error and the run goes on. ``--time-budget``
(seconds since start): rows are skipped once it is spent, or when the same row at the previous length
(compile time as it was, run time scaled by (N / N_prev)^2) predicts it would overrun; timed repetitions
stop early as well, and a row whose warm-up run takes over ``--long-run`` seconds gets one timed run.
Lengths run largest first (32k, 16k, 8k by default), so a short budget cuts the least interesting ones. Results are
rewritten after every row to ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/gpu_generate``),
so a run killed from outside keeps what it measured.

    python benchmarks/gpu_generate.py                       # on the GPU (about 4-5 min on an H200)
    JAX_PLATFORMS=cpu python benchmarks/gpu_generate.py --smoke --out /tmp/gg   # tiny sizes, CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback

T0 = time.perf_counter()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from models.qwen2_5_vl import init_params  # noqa: E402
from models.qwen2_5_vl.config import TextConfig, tiny_config  # noqa: E402
from purekv_jax import generation as G  # noqa: E402
from purekv_jax.compile_cache import clear_compile_cache  # noqa: E402
from purekv_jax.config import PureKVConfig  # noqa: E402

MIB = 2.0**20
SMOKE = dict(sizes="1024,640", layers=4, hidden=128, intermediate=256, heads=4, kv_heads=2, mrope="4,6,6",
             vocab=1024, slot="4x6", text_before=20, text_after=12, new=8, reps=2, st_backends="xla",
             dtype="float32")


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def sdpa_attention(q, k, v, valid, layer=None):
    """Causal ``jax.nn.dot_product_attention`` (cuDNN on the GPU, XLA elsewhere) in generate's prefill
    attention protocol. Ignores ``valid``: only for prompts without padding (the script checks)."""
    t = lambda x: x.transpose(0, 2, 1, 3)
    impl = "cudnn" if jax.default_backend() in ("gpu", "cuda") else None
    return t(jax.nn.dot_product_attention(t(q), t(k), t(v), is_causal=True, implementation=impl))


def model_config(*, vocab, hidden, inter, layers, heads, kv_heads, mrope):
    text = TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, mrope_section=mrope,
                      max_position_embeddings=128_000)
    cfg = tiny_config(vocab_size=vocab)
    return dataclasses.replace(cfg, text=text, vision=dataclasses.replace(cfg.vision, out_hidden_size=hidden))


def make_prompt(config, n_target, slot, text_before, text_after, dtype, seed=0):
    """ids [1, N] (N a multiple of 64), pixel_values_videos (device array, ``dtype``), video_grid_thw."""
    h, w = slot
    m = config.vision.spatial_merge_size
    t = max(1, (n_target - text_before - text_after - 2) // (h * w))
    n = text_before + 2 + t * h * w + text_after
    after = text_after + (-n % 64)
    rng = np.random.default_rng(seed)
    ids = np.concatenate([
        rng.integers(0, 900, text_before), [config.vision_start_token_id],
        np.full(t * h * w, config.video_token_id), [config.vision_end_token_id], rng.integers(0, 900, after),
    ]).astype(np.int32)[None]
    grid = np.array([[t, h * m, w * m]])
    pixels = jax.random.normal(jax.random.key(seed), (t * h * m * w * m, config.vision.patch_dim), dtype)
    return ids, pixels, grid, (t, h, w)


def row_specs(st_backends):
    """(key, label, policy, attention) in display order; the first ST backend also gets an sdpa row."""
    out = [("full", "full cache (policy=None)", None, "auto"),
           ("purekv", "PureKV default, budget 0.2", PureKVConfig(budget=0.2), "auto")]
    for b in st_backends:
        out.append((f"st-{b}", f"PureKV 0.2 + ST-SpAttn ({b})",
                    PureKVConfig(budget=0.2, st_sparse=True, st_backend=b, st_select="always"), "auto"))
    out.append(("paper", "paper CLIE, PureKVConfig.paper(0.2)", PureKVConfig.paper(0.2), "auto"))
    out.append(("full-sdpa", "ref: full cache, dense layers via sdpa", None, sdpa_attention))
    b = st_backends[0]
    out.append((f"st-{b}-sdpa", f"ref: PureKV 0.2 + ST ({b}), dense layers via sdpa",
                PureKVConfig(budget=0.2, st_sparse=True, st_backend=b, st_select="always"), sdpa_attention))
    return out


def run_order(keys, st_backends):
    """Most informative first (the budget cuts the tail): full, first ST, purekv, paper, sdpa refs, rest."""
    first = [k for k in ("full", f"st-{st_backends[0]}", "purekv", "paper", "full-sdpa",
                         f"st-{st_backends[0]}-sdpa") if k in keys]
    return first + [k for k in keys if k not in first]


def fmt(x, f):
    return "-" if x is None else format(x, f)


def table(rows):
    lines = ["| N | video t x h x w | row | prefill s (median, runs) | prefill speed-up vs full | decode ms/token "
             "| decode speed-up vs full | prefill compile s | decode compile s | KV kept MiB | KV full MiB "
             "| full / kept | prefill peak MiB | ST layers | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['N']} | {r['video']} | {r['label']} |"
        if "error" in r or "skipped" in r:
            note = f"error: {r['error'][:160]}" if "error" in r else f"skipped: {r['skipped']}"
            lines.append(head + " - | - | - | - | - | - | - | - | - | - | - | " + note.replace("|", "/") + " |")
            continue
        runs = f"{r['prefill_s']:.3f} ({len(r['prefill_runs_s'])})" if r["prefill_runs_s"] else \
            f"{r['prefill_s']:.3f} (warm-up only)"
        st = ",".join(map(str, r["st_layers"])) if r["st_layers"] else "-"
        lines.append(
            head + f" {runs} | {fmt(r.get('prefill_speedup'), '.2f')} | {r['decode_ms_per_token']:.2f} | "
            f"{fmt(r.get('decode_speedup'), '.2f')} | {r['prefill_compile_s']:.1f} | {r['decode_compile_s']:.1f} | "
            f"{r['kv_bytes_kept'] / MIB:.1f} | {r['kv_bytes_full'] / MIB:.1f} | {r['kv_compression']:.2f} | "
            f"{fmt(None if r['prefill_peak_bytes'] is None else r['prefill_peak_bytes'] / MIB, '.0f')} | {st} | "
            f"{r.get('note', '')} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, float32, st backend xla (CPU check)")
    ap.add_argument("--sizes", default="32768,16384,8192",
                    help="target prompt lengths, run in this order (largest first: the budget cuts the small ones)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=3584)
    ap.add_argument("--intermediate", type=int, default=18944)
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--mrope", default="16,24,24", help="M-RoPE sections (sum = head_dim / 2)")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--slot", default="24x24", help="merged video tokens per temporal slot, h x w")
    ap.add_argument("--text-before", type=int, default=200)
    ap.add_argument("--text-after", type=int, default=40)
    ap.add_argument("--new", type=int, default=64, help="max_new_tokens (EOS off)")
    ap.add_argument("--reps", type=int, default=3, help="timed runs after the warm-up run (at most)")
    ap.add_argument("--st-backends", default="triton,mosaic_gpu")
    ap.add_argument("--rows", default=None, help="comma-separated row keys to run (default: all)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--time-budget", type=float, default=240.0, help="seconds since start; later rows skipped")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "gpu_generate"),
                    help="output path without extension (.json and .md are written)")
    ap.add_argument("--long-run", type=float, default=5.0,
                    help="seconds: a row whose warm-up run (prefill + decode) takes longer gets one timed run")
    args = ap.parse_args(argv)
    if args.smoke:  # smoke presets; flags given explicitly still win
        ap.set_defaults(**SMOKE)
        args = ap.parse_args(argv)
    global T0
    T0 = time.perf_counter()
    dtype = jnp.dtype(args.dtype)
    st_backends = [b for b in args.st_backends.split(",") if b]
    slot = tuple(int(x) for x in args.slot.split("x"))
    config = model_config(vocab=args.vocab, hidden=args.hidden, inter=args.intermediate, layers=args.layers,
                          heads=args.heads, kv_heads=args.kv_heads, mrope=tuple(int(x) for x in args.mrope.split(",")))
    specs = row_specs(st_backends)
    keys = [s[0] for s in specs]
    if args.rows:
        want = args.rows.split(",")
        bad = [k for k in want if k not in keys]
        if bad:
            ap.error(f"unknown --rows {bad}; known: {keys}")
        keys = [k for k in keys if k in want]
    by_key = {s[0]: s for s in specs}
    order = run_order(keys, st_backends)

    tc = config.text
    log(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    settings = dict(
        smoke=args.smoke, sizes=args.sizes, layers=tc.num_hidden_layers, hidden=tc.hidden_size,
        intermediate=tc.intermediate_size, heads=tc.num_attention_heads, kv_heads=tc.num_key_value_heads,
        head_dim=tc.head_dim, vocab=tc.vocab_size, dtype=str(dtype), vision=dict(
            depth=config.vision.depth, hidden=config.vision.hidden_size), slot=slot, text_before=args.text_before,
        text_after_min=args.text_after, max_new_tokens=args.new, reps=args.reps, st_backends=st_backends,
        rows=order, time_budget_s=args.time_budget)
    log("settings:", json.dumps(settings))
    t0 = time.perf_counter()
    params = init_params(config, jax.random.key(0), dtype)
    jax.block_until_ready(params)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    log(f"init_params: {time.perf_counter() - t0:.1f}s, weights {weight_bytes / MIB:.0f} MiB")

    meta = {"jax": jax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "settings": settings, "weight_bytes": weight_bytes}
    results = []
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)

    def display_sorted():
        rank = {k: i for i, k in enumerate(keys)}
        return sorted(results, key=lambda r: (r["N"], rank[r["key"]]))

    def write():
        rows = display_sorted()
        try:  # process-wide device memory (GPU: the peak over every row so far; CPU: none)
            ms = jax.devices()[0].memory_stats() or {}
            meta["device_memory"] = {k: ms[k] for k in ("peak_bytes_in_use", "bytes_limit") if k in ms}
        except Exception:  # noqa: BLE001
            pass
        md = (f"# generate end to end ({jax.default_backend()}, jax {jax.__version__}, {jax.devices()[0]})\n\n"
              f"Model: {tc.num_hidden_layers} layers, hidden {tc.hidden_size}, {tc.num_attention_heads} q / "
              f"{tc.num_key_value_heads} KV heads (head_dim {tc.head_dim}), intermediate {tc.intermediate_size}, "
              f"vocab {tc.vocab_size}, {dtype}, random weights ({weight_bytes / MIB:.0f} MiB); tiny vision tower. "
              f"Batch 1, {args.new} new tokens, EOS off. Prefill: median of up to {args.reps} runs after a "
              f"warm-up run (one run when the warm-up took > {args.long_run:.0f} s), compile excluded; decode "
              f"compile 0.0 = the program of an earlier row with the same cache capacity was reused. KV: prompt K+V after prefill, all layers. Peak: XLA memory "
              f"analysis of the compiled prefill (incl. weights). 'ref' rows use jax.nn.dot_product_attention "
              f"(cuDNN on GPU) for the dense prefill layers.\n\n" + table(rows) + "\n")
        if meta.get("device_memory"):
            md += "\nDevice memory (whole run): " + ", ".join(
                f"{k} {v / MIB:.0f} MiB" for k, v in meta["device_memory"].items()) + "\n"
        with open(args.out + ".md", "w") as fh:
            fh.write(md)
        with open(args.out + ".json", "w") as fh:
            json.dump({"meta": meta, "results": rows}, fh, indent=1)

    last_cost = {}  # key -> (N, seconds the row took)
    for n_target in (int(s) for s in args.sizes.split(",")):
        ids, pixels, grid, (t, h, w) = make_prompt(config, n_target, slot, args.text_before, args.text_after, dtype)
        n = ids.shape[1]
        video = f"{t}x{h}x{w}"
        mm = dict(pixel_values_videos=pixels, video_grid_thw=grid, second_per_grid_ts=np.ones(1, np.float32))
        log(f"N={n}: text {args.text_before} + video {video} = {t * h * w} tokens + question {n - args.text_before - 2 - t * h * w}")
        base = {}
        for key in order:
            _, label, pol, att = by_key[key]
            row = {"N": n, "video": video, "key": key, "label": label}
            elapsed = time.perf_counter() - T0
            pred = None
            if key in last_cost:  # compile as before, run time scaled by (N / N_prev)^2 (an upper bound)
                n0, comp0, run0 = last_cost[key]
                pred = comp0 + run0 * (n / n0) ** 2
            if elapsed > args.time_budget:
                row["skipped"] = f"time budget {args.time_budget:.0f}s spent ({elapsed:.0f}s)"
            elif pred is not None and elapsed + pred > args.time_budget:
                row["skipped"] = f"predicted {pred:.0f}s would overrun the budget ({elapsed:.0f}s of {args.time_budget:.0f}s used)"
            if "skipped" in row:
                log(key, "skipped:", row["skipped"])
                results.append(row)
                write()
                continue
            r0 = time.perf_counter()
            try:
                gen = lambda: G.generate(params, config, ids, policy=pol, max_new_tokens=args.new, eos_token_id=(),
                                         attention=att, **mm)
                first = gen()
                s = first.stats
                if s["padded_len"] != s["prompt_len"]:
                    raise RuntimeError(f"prompt padded {s['prompt_len']} -> {s['padded_len']}: the sdpa rows need none")
                runs, dec = [], []
                reps = args.reps if s["prefill_s"] + s["decode_s"] < args.long_run else min(args.reps, 1)
                for _ in range(reps):
                    if time.perf_counter() - T0 + s["prefill_s"] + s["decode_s"] > args.time_budget:
                        row["note"] = "fewer runs (time budget)"
                        break
                    rs = gen().stats
                    runs.append(rs["prefill_s"])
                    dec.append(rs["decode_s"] / max(rs["decode_steps"], 1))
                row.update(
                    prefill_s=statistics.median(runs) if runs else s["prefill_s"], prefill_runs_s=runs,
                    prefill_warmup_s=s["prefill_s"], decode_ms_per_token=1e3 * statistics.median(dec or [s["decode_s"] / max(s["decode_steps"], 1)]),
                    decode_steps=s["decode_steps"], prefill_compile_s=s["prefill_compile_s"],
                    decode_compile_s=s["decode_compile_s"], kv_bytes_full=s["kv_bytes_full"],
                    kv_bytes_kept=s["kv_bytes_kept"], kv_bytes_allocated=s["kv_bytes_allocated"],
                    kv_compression=s["kv_compression"], prefill_peak_bytes=s["prefill_peak_bytes"],
                    prefill_temp_bytes=s["prefill_temp_bytes"], st_layers=list(s["st_layers"]),
                    budget_tokens=int(s["budgets"][0]), capacity=s["capacity"], prompt_len=s["prompt_len"])
                if key == "full":
                    base = dict(prefill=row["prefill_s"], decode=row["decode_ms_per_token"])
                if base:
                    row["prefill_speedup"] = base["prefill"] / row["prefill_s"]
                    row["decode_speedup"] = base["decode"] / row["decode_ms_per_token"]
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]
                log(key, "failed:", row["error"])
                traceback.print_exc(limit=4)
            row["row_wall_s"] = time.perf_counter() - r0
            comp = row.get("prefill_compile_s", 0.0) + row.get("decode_compile_s", 0.0)
            last_cost[key] = (n, comp, max(row["row_wall_s"] - comp, 0.0))
            results.append(row)
            log({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
            write()
        clear_compile_cache()

    print("\n" + table(display_sorted()), flush=True)
    log(f"done; wrote {args.out}.md and {args.out}.json")
    return results


if __name__ == "__main__":
    main()
