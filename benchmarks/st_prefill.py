"""End-to-end prefill with ST-SpAttn on and off (not a test), on the bench-sized model.

Bench model: Qwen2.5-VL text stack with hidden 512, 8 layers, 8 query heads, 2 KV heads (head_dim 64),
random weights, and the tiny random vision tower (hidden 32, depth 2) projecting to 512. Prompt: short
text, one video whose merged grid is t x h x w tokens (default 16x24x24 = 9,216 video tokens), short
text. ``generate(..., max_new_tokens=1)`` runs the whole prefill (vision tower, embedding merge, the 8
decoder layers, KV pruning) as one compiled program; the table gives the median of ``stats["prefill_s"]``
(compile excluded; the rows' runs are interleaved round by round) for: no compression and CLIE at 20%, each with ST-SpAttn off (flash-style dense
prefill attention) and on (block-sparse in layers >= st_start = 3, union pattern, XLA gathered-block
fallback on the CPU), plus the block density of the ST layers.

    JAX_PLATFORMS=cpu python benchmarks/st_prefill.py [--grid 16x24x24] [--reps 3] [--block 128]
"""

from __future__ import annotations

import argparse
import statistics

import jax
import numpy as np

from models.qwen2_5_vl import init_params
from purekv_jax import generation as G
from purekv_jax.compile_cache import clear_compile_cache
from purekv_jax.config import PureKVConfig
from purekv_jax.st_sparse import HeadPattern, block_tables
from purekv_jax.speed.model import bench_small_config, video_prompt
from purekv_jax.st_sparse.prefill import row_layouts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="16x24x24", help="merged video grid t x h x w (tokens)")
    ap.add_argument("--text-before", type=int, default=48)
    ap.add_argument("--text-after", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--only", default=None, help="comma-separated row numbers to run (1-6)")
    args = ap.parse_args(argv)

    config = bench_small_config(1024)
    t, h, w = (int(x) for x in args.grid.split("x"))
    prompt = video_prompt(config, (t, h, w), args.text_before, args.text_after)
    ids, grid, mm = prompt.input_ids, prompt.video_grid_thw, prompt.media()
    params = init_params(config, jax.random.key(0))

    common = dict(window=32, sink=4, st_block_q=args.block, st_block_k=args.block, st_backend="xla")
    runs = [
        ("no compression", "off", PureKVConfig(budget=1.0, cross_layer=False, **common)),
        ("no compression", "on", PureKVConfig(budget=1.0, cross_layer=False, st_sparse=True, st_select="always", **common)),
        (f"CLIE {int(args.budget * 100)}%", "off", PureKVConfig(budget=args.budget, **common)),
        (f"CLIE {int(args.budget * 100)}%", "on", PureKVConfig(budget=args.budget, st_sparse=True, st_select="always", **common)),
        ("no compression", "auto", PureKVConfig(budget=1.0, cross_layer=False, st_sparse=True, **common)),
        (f"CLIE {int(args.budget * 100)}%", "auto", PureKVConfig(budget=args.budget, st_sparse=True, **common)),
    ]
    if args.only:
        keep = {int(x) for x in args.only.split(",")}
        runs = [r for i, r in enumerate(runs, 1) if i in keep]

    n = ids.shape[1]
    padded = -(-n // 64) * 64
    ids_al, valid = G.realign_left(ids, np.ones_like(ids, bool), padded, 0)
    ((off, lay),) = row_layouts(config, ids_al, valid, tuple(map(tuple, grid.tolist())))
    tab = block_tables(lay, HeadPattern.UNION, args.block, args.block)
    st_start = PureKVConfig(st_sparse=True).st_first_layer()
    n_st = config.text.num_hidden_layers - st_start
    print(f"# ST-SpAttn end-to-end prefill, CPU (jax {jax.__version__}, {jax.default_backend()}, "
          f"{jax.device_count()} device(s))\n")
    print(f"bench model: text hidden 512, 8 layers, 8 q heads / 2 KV heads (head_dim 64), float32, random "
          f"weights; vision tower hidden 32, depth 2. Prompt: {n} tokens ({args.text_before} text + "
          f"video {t}x{h}x{w} = {t * h * w} tokens + {args.text_after} text), padded to {padded}. ST layers "
          f"{st_start}..7 ({n_st} of 8), union pattern, blocks {args.block}x{args.block}, XLA fallback; "
          f"off = flash-style dense prefill attention. Median of {args.reps} interleaved rounds after one compile run each.\n")
    print(f"ST union density: {tab.density:.3f} of all blocks, {tab.causal_density:.3f} of causal blocks "
          f"(video rows only: see benchmarks/st_sparse_cpu.py)\n")
    print("| policy | ST-SpAttn (on: always block-sparse; auto: the cost model's choice) | density (ST layers, "
          "blocks computed / all) or path | prefill median s | min s | "
          "compile s | speed-up | kept KV |")
    print("|---|---|---|---|---|---|---|---|")
    # compile every program first, then interleave the runs (round r runs every row once) so that the
    # load of a shared machine drifts over all rows alike
    first = {}
    for i, (_, _, pol) in enumerate(runs):
        first[i] = G.generate(params, config, ids, policy=pol, max_new_tokens=1, **mm)
    times = {i: [] for i in range(len(runs))}
    for _ in range(args.reps):
        for i, (_, _, pol) in enumerate(runs):
            times[i].append(G.generate(params, config, ids, policy=pol, max_new_tokens=1, **mm).stats["prefill_s"])
    base = {}
    for i, (name, st, pol) in enumerate(runs):
        med = statistics.median(times[i])
        if st == "off":
            base[name] = med
        sp = f"{base[name] / med:.2f}x" if st != "off" and name in base else "1.00x" if st == "off" else "-"
        res = first[i]
        dens = {"on": f"{tab.density:.3f}", "off": "dense path (flash: the causal blocks)"}.get(st) or ", ".join(
            f"{p['path']} (predicted sparse {p['sparse_s'] * 1e3:.0f} ms / dense {p['dense_s'] * 1e3:.0f} ms per layer)"
            if p["sparse_s"] is not None else p["path"] for p in res.stats["st_paths"])
        kept = res.stats["kv_bytes_kept"] / res.stats["kv_bytes_full"]
        print(f"| {name} | {st} | {dens} | {med:.2f} | {min(times[i]):.2f} | "
              f"{res.stats['prefill_compile_s']:.1f} | {sp} | {kept:.0%} |", flush=True)
    clear_compile_cache()


if __name__ == "__main__":
    main()
