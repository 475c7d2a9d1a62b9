"""End to end on a Qwen2.5-VL-7B-shaped model: prefill speed of full / PureKV / ST-SpAttn / eager SnapKV, the
Amdahl bound of ST-SpAttn, and batch-decode throughput from the smaller cache (random bf16 weights; not a test).

Model: the 7B text stack (28 layers, hidden 3584, 28 q / 4 KV heads, head_dim 128, MLP 18944, M-RoPE
(16, 24, 24)), vocab 32k, random bf16 weights. ``generate`` runs with the tiny vision tower of
``tiny_config`` (projecting to 3584) so that the prompt still carries a real video (grid, M-RoPE, layout);
the 7B vision tower (depth 32, hidden 1280, 16 heads, MLP 3420, window attention, full attention in blocks
7/15/23/31) is timed apart on the same video (``vision`` rows), and ``e2e`` = vision + prefill.

Steps, most important first (``--time-budget`` cuts the tail; every row is written as soon as it is measured,
to ``<out>.json`` and ``<out>.md``):

1. per prompt length (16k first, then 32k, 64k): ``vision``; ``attn``: one layer's dense causal attention
   alone (the "auto" prefill attention: cuDNN on a GPU) at that length; prefill rows through
   ``generate``: ``full`` (policy None), ``purekv`` (PureKVConfig(budget=0.2)), ``st-mix`` (PureKV 0.2 +
   ST-SpAttn, per-layer patterns u/s/s/t per KV group, the shape calibration returns), ``st-union``
   (all-union heads), ``snapkv-eager`` (SnapKV in every layer with the dense N x N attention: the
   eager-attention SnapKV prefill the paper compares with; only where its N x N scores fit), and
   ``full-flash`` (the XLA flash scan instead of cuDNN: what the cuDNN path gains; 16k only);
0. ``decode`` (first: it needs no prompt): batch decode from 16k-token prompts with the full cache and with PureKV 20% kept: the
   largest batch whose cache fits beside the weights (the decode program's memory analysis, scaled down
   until it fits), tokens/s there (a synthetic cache: prefilling hundreds of 16k prompts does not fit in the
   session; the decode step reads the same bytes either way).

Amdahl: an ST row changes only the attention of its ST layers, so against the ``purekv`` row (same scoring
and cache writing) its best possible prefill time is ``T_purekv - L_st * t_attn * (1 - rho)`` with
``t_attn`` the ``attn`` row and ``rho`` the computed cells of its kernel over the causal cells (from the
block tables of the prompt's layout). Reported: the bound, the measured time and ``bound / measured``
(the issue asks >= 0.85).

    python benchmarks/gpu_e2e.py --out $OUT/gpu_e2e                 # on the GPU
    JAX_PLATFORMS=cpu python benchmarks/gpu_e2e.py --smoke --out /tmp/e2e   # tiny sizes, CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

T0 = time.perf_counter()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import median_ms  # noqa: E402
from gpu_generate import make_prompt, model_config  # noqa: E402
from models.qwen2_5_vl import init_params  # noqa: E402
from models.qwen2_5_vl.config import VisionConfig  # noqa: E402
from models.qwen2_5_vl.vision import init_vision_params, vision_forward  # noqa: E402
from purekv_jax import cache as C  # noqa: E402
from purekv_jax import generation as G  # noqa: E402
from purekv_jax.attention import prefill_attention_impl  # noqa: E402
from purekv_jax.compile_cache import clear_compile_cache  # noqa: E402
from purekv_jax.config import PureKVConfig  # noqa: E402
from purekv_jax.decode import SamplingSettings, decode_program  # noqa: E402
from purekv_jax.presets import PRESETS  # noqa: E402
from purekv_jax.st_sparse.cost import sparse_cells  # noqa: E402
from purekv_jax.st_sparse.prefill import row_layouts  # noqa: E402

MIB, GIB = 2.0**20, 2.0**30
VISION_7B = VisionConfig(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584)
SMOKE = dict(sizes="640,1024", layers=4, hidden=128, intermediate=256, heads=4, kv_heads=2, mrope="4,6,6",
             vocab=1024, slot="4x6", text_before=20, text_after=12, new=4, reps=1, dtype="float32",
             decode_prompt=640, decode_max_batch=8, st_backend="xla", snapkv_max=1024, vision="tiny")


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def mix_patterns(layers, heads, kv_heads):
    """Per-layer patterns shaped like calibration's output: per KV group union / spatial / spatial / temporal."""
    g = heads // kv_heads
    seq = (["union", "spatial", "spatial", "temporal"] * kv_heads)[:kv_heads]
    return (tuple(p for p in seq for _ in range(g)),) * layers


def prefill_rows(args, n_layers, heads, kv_heads):
    """(key, label, policy, attention) of the prefill rows."""
    st = dict(budget=0.2, st_sparse=True, st_backend=args.st_backend, st_select="always")
    return [("full", "full cache, 'auto' attention (cuDNN on a GPU)", None, "auto"),
            ("purekv", "PureKV 0.2", PureKVConfig(budget=0.2), "auto"),
            ("st-mix", "PureKV 0.2 + ST (mixed patterns)",
             PureKVConfig(head_patterns=mix_patterns(n_layers, heads, kv_heads), **st), "auto"),
            ("st-union", "PureKV 0.2 + ST (all union)", PureKVConfig(**st), "auto"),
            ("snapkv-eager", "SnapKV 0.2, eager N x N attention", PRESETS["snapkv"].make(0.2, n_layers), "dense"),
            ("full-flash", "full cache, XLA flash scan", None, "flash")]


def st_density(config, ids, grid, policy, n, backend, heads):
    """Computed cells of the ST kernel over the causal cells, for the row's layout and the plan's first ST
    layer's patterns (every ST layer has the same set here)."""
    (off, lay), = row_layouts(config, ids, np.ones(ids.shape, bool), tuple(map(tuple, np.asarray(grid).tolist())))
    pats = policy.head_patterns[-1] if policy.head_patterns else ("union",) * heads
    cells, _ = sparse_cells(lay, pats, heads, backend, None, None)
    return cells / (heads * n * (n + 1) / 2)


def time_generate(params, config, ids, mm, policy, attention, new, reps):
    gen = lambda: G.generate(params, config, ids, policy=policy, max_new_tokens=new, eos_token_id=(),
                             attention=attention, **mm)
    first = gen().stats
    runs = [gen().stats["prefill_s"] for _ in range(reps)]
    return first, statistics.median(runs) if runs else first["prefill_s"]


def time_vision(vcfg, grid, dtype, reps):
    params = init_vision_params(vcfg, jax.random.key(1), dtype)
    patches = int(np.prod(grid))
    pixels = jax.random.normal(jax.random.key(2), (patches, vcfg.patch_dim), dtype)
    fn = jax.jit(lambda p, x: vision_forward(p, x, (tuple(grid),), vcfg))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, pixels))
    compile_s = time.perf_counter() - t0
    return median_ms(fn, (params, pixels), reps, warmup=0) / 1e3, compile_s, patches


def time_attention(tc, n, dtype, reps):
    """One layer's "auto" prefill attention alone at n tokens, batch 1 (seconds)."""
    keys = jax.random.split(jax.random.key(n), 3)
    q = jax.random.normal(keys[0], (1, tc.num_attention_heads, n, tc.head_dim), dtype)
    k, v = (jax.random.normal(x, (1, tc.num_key_value_heads, n, tc.head_dim), dtype) for x in keys[1:])
    fn = jax.jit(prefill_attention_impl("auto", n))
    return median_ms(fn, (q, k, v, jnp.ones((1, n), bool), 0), max(reps, 3)) / 1e3


def synthetic_cache(tc, batch, kept, capacity, prompt_len, dtype):
    """A cache of ``batch`` rows with ``kept`` valid prompt entries each (values from a small random block
    broadcast: decode reads every slot the same way whatever it holds)."""
    shape = (tc.num_hidden_layers, batch, tc.num_key_value_heads, capacity, tc.head_dim)

    @jax.jit
    def build(seed_block):
        kv = jnp.broadcast_to(seed_block[:, None, None, None, :], shape).astype(dtype)
        valid = jnp.broadcast_to(jnp.arange(capacity) < kept, shape[:-1])
        b = jnp.full((batch,), kept, jnp.int32)
        return C.KVCache(k=kv, v=kv + 1, valid=valid, length=b, next_position=jnp.full((batch,), prompt_len,
                                                                                         jnp.int32),
                         rope_delta=jnp.zeros((batch,), jnp.int32))

    return build(jax.random.normal(jax.random.key(3), (tc.num_hidden_layers, tc.head_dim), jnp.float32))


def decode_row(params, tc, kept, prompt_len, new, dtype, cache_bytes, limit_bytes, max_batch):
    """The largest batch (<= max_batch) with ``kept`` prompt entries per row whose cache fits ``cache_bytes`` and
    whose decode program (weights, cache, temporaries) fits ``limit_bytes``, and its tokens/s."""
    capacity = kept + new
    settings = SamplingSettings(n_tokens=new)
    per_row = 2 * tc.num_hidden_layers * tc.num_key_value_heads * capacity * tc.head_dim * jnp.dtype(dtype).itemsize
    batch = int(max(1, min(max_batch, cache_bytes // per_row)))
    tried = []
    while True:
        cache = synthetic_cache(tc, batch, kept, capacity, prompt_len, dtype)
        logits = jnp.zeros((batch, tc.vocab_size), jnp.float32)
        prog, dargs = decode_program(params, cache, logits, new, 0, cfg=tc, sampling=settings)
        need = None
        if prog.memory is not None:
            m = prog.memory
            need = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        tried.append((batch, need))
        if need is None or need <= limit_bytes or batch == 1:
            break
        del cache, dargs
        batch = max(1, int(batch * min(0.9, limit_bytes / need)))
    t0 = time.perf_counter()
    out = prog.run(*dargs)
    jax.block_until_ready(out.tokens)
    seconds = time.perf_counter() - t0
    steps = int(out.step)
    return dict(batch=batch, capacity=capacity, kept=kept, cache_bytes=per_row * batch, decode_s=seconds,
                steps=steps, tokens_per_s=batch * steps / seconds, compile_s=prog.compile_s, tried=tried)


def fmt(x, f):
    return "-" if x is None else format(x, f)


def markdown(meta, rows):
    lines = [f"# End to end, 7B-shaped ({meta['backend']}, jax {meta['jax']}, {meta['device']}, commit "
             f"{meta['commit'][:10]})", "",
             "Prefill: median seconds of generate's prefill (compile excluded); e2e = 7B vision tower + prefill. "
             "Amdahl: bound = T_purekv - L_st * t_attn * (1 - density); 'of bound' = bound / measured.", "",
             "| N | row | prefill s | e2e s | vs full | vs snapkv-eager | KV kept / full | ST layers | density "
             "| Amdahl bound s | of bound | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "prefill":
            continue
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['N']} | {r['label']} | - | - | - | - | - | - | - | - | - | "
                         f"{(r.get('error') or 'skipped: ' + r['skipped'])[:150].replace('|', '/')} |")
            continue
        lines.append(f"| {r['N']} | {r['label']} | {r['prefill_s']:.3f} | {fmt(r.get('e2e_s'), '.3f')} | "
                     f"{fmt(r.get('speedup_vs_full'), '.2f')} | {fmt(r.get('speedup_vs_snapkv'), '.2f')} | "
                     f"{r['kv_ratio']:.3f} | {r['st_layers']} | {fmt(r.get('density'), '.3f')} | "
                     f"{fmt(r.get('amdahl_bound_s'), '.3f')} | {fmt(r.get('of_bound'), '.2f')} | |")
    lines += ["", "| N | measured | seconds | note |", "|---|---|---|---|"]
    for r in rows:
        if r["kind"] in ("vision", "attn"):
            what = (f"{meta['settings']['vision']} vision tower, {r.get('patches', '-')} patches") if r["kind"] == "vision" \
                else "one layer's auto prefill attention (attention share of full: " \
                     f"{fmt(r.get('attention_share'), '.3f')})"
            lines.append(f"| {r['N']} | {what} | {fmt(r.get('seconds'), '.4f')} | {r.get('error', '')[:150]} |")
    lines += ["", "| decode from N | cache | batch | KV GiB | tokens/s | ratio vs full | note |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "decode":
            if "error" in r or "skipped" in r:
                lines.append(f"| {r['N']} | {r['label']} | - | - | - | - | "
                             f"{(r.get('error') or r.get('skipped'))[:150]} |")
                continue
            lines.append(f"| {r['N']} | {r['label']} | {r['batch']} | {r['cache_bytes'] / GIB:.1f} | "
                         f"{r['tokens_per_s']:.0f} | {fmt(r.get('ratio_vs_full'), '.2f')} | |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, float32, CPU-friendly")
    ap.add_argument("--sizes", default="16384,32768,65536")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--hidden", type=int, default=3584)
    ap.add_argument("--intermediate", type=int, default=18944)
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--mrope", default="16,24,24")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--slot", default="24x24")
    ap.add_argument("--text-before", type=int, default=200)
    ap.add_argument("--text-after", type=int, default=40)
    ap.add_argument("--new", type=int, default=16, help="max_new_tokens of the prefill rows and the decode rows")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--st-backend", default="auto")
    ap.add_argument("--snapkv-max", type=int, default=20000, help="longest prompt for the eager SnapKV row")
    ap.add_argument("--decode-prompt", type=int, default=16384)
    ap.add_argument("--decode-max-batch", type=int, default=1024)
    ap.add_argument("--vision", default="7b", choices=("7b", "tiny"))
    ap.add_argument("--time-budget", type=float, default=270.0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu_e2e"))
    args = ap.parse_args(argv)
    if args.smoke:
        ap.set_defaults(**SMOKE)
        args = ap.parse_args(argv)
    global T0
    T0 = time.perf_counter()
    dtype = jnp.dtype(args.dtype)
    slot = tuple(int(x) for x in args.slot.split("x"))
    config = model_config(vocab=args.vocab, hidden=args.hidden, inter=args.intermediate, layers=args.layers,
                          heads=args.heads, kv_heads=args.kv_heads, mrope=tuple(int(x) for x in args.mrope.split(",")))
    tc = config.text
    vcfg = VISION_7B if args.vision == "7b" else config.vision
    dev = jax.devices()[0]
    meta = {"jax": jax.__version__, "backend": jax.default_backend(), "device": str(dev), "commit": git_commit(),
            "python": sys.version.split()[0], "settings": vars(args)}
    log("meta:", json.dumps(meta))
    params = init_params(config, jax.random.key(0), dtype)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    meta["weight_bytes"] = weight_bytes
    log(f"weights {weight_bytes / GIB:.2f} GiB")
    rows = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def write():
        with open(args.out + ".json.tmp", "w") as fh:
            json.dump({"meta": meta, "results": rows}, fh, indent=1, default=str)
        os.replace(args.out + ".json.tmp", args.out + ".json")
        with open(args.out + ".md.tmp", "w") as fh:
            fh.write(markdown(meta, rows))
        os.replace(args.out + ".md.tmp", args.out + ".md")

    def over_budget():
        return time.perf_counter() - T0 > args.time_budget

    def attempt(row, fn):
        if over_budget():
            row["skipped"] = f"time budget {args.time_budget:.0f}s spent"
        else:
            r0 = time.perf_counter()
            try:
                fn(row)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                traceback.print_exc(limit=3)
            row["wall_s"] = time.perf_counter() - r0
        rows.append(row)
        log({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "tried"})
        write()

    sizes = [int(s) for s in args.sizes.split(",")]
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit", 8 * GIB if args.smoke else 0)
    free = 0.92 * (limit - weight_bytes) - 2 * GIB * (not args.smoke)   # for the cache
    base_tps = {}
    for key, label, frac in (("full", "full cache", 1.0), ("purekv", "PureKV 0.2", 0.2)):
        def dec(row, frac=frac, key=key):
            kept = int(np.ceil(args.decode_prompt * frac / 64) * 64)
            row.update(decode_row(params, tc, kept, args.decode_prompt, args.new, dtype, int(free),
                                  int(0.95 * limit), args.decode_max_batch))
            base_tps[key] = row["tokens_per_s"]
            if key != "full" and "full" in base_tps:
                row["ratio_vs_full"] = row["tokens_per_s"] / base_tps["full"]

        attempt({"kind": "decode", "N": args.decode_prompt, "key": key, "label": label}, dec)
    clear_compile_cache()

    for size_no, n_target in enumerate(sizes):
        ids, pixels, grid, (t, h, w) = make_prompt(config, n_target, slot, args.text_before, args.text_after, dtype)
        n = ids.shape[1]
        mm = dict(pixel_values_videos=pixels, video_grid_thw=grid, second_per_grid_ts=np.ones(1, np.float32))
        m = config.vision.spatial_merge_size
        log(f"N={n}: video {t}x{h}x{w}")
        got = {}

        def vision(row):
            row["seconds"], row["compile_s"], row["patches"] = time_vision(vcfg, (t, h * m, w * m), dtype, args.reps)
            got["vision"] = row["seconds"]

        def attn(row):
            row["seconds"] = got["attn"] = time_attention(tc, n, dtype, args.reps)

        attempt({"kind": "vision", "N": n}, vision)
        attempt({"kind": "attn", "N": n}, attn)
        for key, label, policy, attention in prefill_rows(args, tc.num_hidden_layers, tc.num_attention_heads,
                                                          tc.num_key_value_heads):
            if key == "snapkv-eager" and n > args.snapkv_max:
                continue
            if key == "full-flash" and size_no:
                continue

            def prefill(row, policy=policy, attention=attention, key=key):
                s, row["prefill_s"] = time_generate(params, config, ids, mm, policy, attention, args.new, args.reps)
                row.update(compile_s=s["prefill_compile_s"], kv_ratio=s["kv_bytes_kept"] / s["kv_bytes_full"],
                           st_layers=len(s["st_layers"]), peak_bytes=s["prefill_peak_bytes"])
                got[key] = row["prefill_s"]
                if "vision" in got:
                    row["e2e_s"] = got["vision"] + row["prefill_s"]
                if key == "full" and "attn" in got:
                    got_rows = [r for r in rows if r["kind"] == "attn" and r["N"] == n]
                    got_rows[0]["attention_share"] = tc.num_hidden_layers * got["attn"] / row["prefill_s"]
                for base, col in (("full", "speedup_vs_full"), ("snapkv-eager", "speedup_vs_snapkv")):
                    if base in got and key != base:
                        row[col] = got[base] / row["prefill_s"]
                if key.startswith("st-") and row["st_layers"]:
                    row["density"] = st_density(config, ids, grid, policy, n, args.st_backend,
                                                tc.num_attention_heads)
                    if "purekv" in got and "attn" in got:
                        bound = got["purekv"] - row["st_layers"] * got["attn"] * (1 - row["density"])
                        row.update(amdahl_bound_s=bound, of_bound=bound / row["prefill_s"])

            attempt({"kind": "prefill", "N": n, "key": key, "label": label}, prefill)
        clear_compile_cache()
    print("\n" + markdown(meta, rows), flush=True)
    log(f"done; wrote {args.out}.md and {args.out}.json")
    return rows


if __name__ == "__main__":
    main()
