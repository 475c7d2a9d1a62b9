"""Decode attention over a 4-bit / 8-bit quantised cache: the Pallas kernel vs the XLA path on the codes vs
dense attention over the same slots in bf16 (one layer, one new token per row).

Shapes default to Qwen2.5-VL-7B's attention (28 query / 4 KV heads, head_dim 128), a batch of 8 and 16k
quantised slots per row. Prints a table of median ms per call and GB/s of cache read, and writes JSON with
the device, jax version and commit.

  python benchmarks/quant_decode_kernel.py --out benchmarks/results/quant_decode_kernel    (GPU / TPU)
  python benchmarks/quant_decode_kernel.py --smoke          (CPU: tiny shapes, the kernel in interpret mode)
"""

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from _timing import median_ms  # noqa: E402

from kernels.quantized_decode_attention import QuantizedSlots, dense_partials, normalize, quantized_partials  # noqa: E402
from purekv_jax import kv_quant as Q  # noqa: E402


def make_case(b, hkv, g, d, n, bits, group, key):
    kk, kv, kq = jax.random.split(key, 3)
    k = jax.random.normal(kk, (b, hkv, n, d), jnp.float32)
    v = jax.random.normal(kv, (b, hkv, n, d), jnp.float32)
    valid = jnp.ones((b, hkv, n), bool)
    kc, ks, kz = Q.quantize_keys(k, valid, bits, group)
    vc, vs, vz = Q.quantize_values(v, bits, group)
    q = jax.random.normal(kq, (b, hkv, g, d), jnp.bfloat16)
    return q, QuantizedSlots(kc, ks, kz, vc, vs, vz, valid, bits), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), valid


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--slots", type=int, default=16384)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU dry run)")
    args = ap.parse_args()
    b, hkv, g, d, group, n = args.batch, 4, 7, 128, 64, args.slots
    interpret = args.smoke or jax.default_backend() == "cpu"
    if args.smoke:
        b, n, args.reps = 1, 256, 2
    rows = []
    for bits in args.bits:
        q, slots, k, v, valid = make_case(b, hkv, g, d, n, bits, group, jax.random.PRNGKey(bits))
        paths = {
            "bf16 dense (same slots)": jax.jit(lambda q, k, v, m: normalize(dense_partials(q, k, v, m, d**-0.5))),
            "xla on codes": jax.jit(lambda q, s: normalize(quantized_partials(q, s, backend="xla"))),
            "pallas kernel": jax.jit(lambda q, s: normalize(quantized_partials(q, s, backend="pallas",
                                                                               interpret=interpret))),
        }
        ref = paths["xla on codes"](q, slots)
        code_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(slots))
        for name, fn in paths.items():
            fargs = (q, k, v, valid) if name.startswith("bf16") else (q, slots)
            ms = median_ms(fn, fargs, args.reps)
            read = 2 * k.size * 2 if name.startswith("bf16") else code_bytes
            err = None if name.startswith("bf16") else float(jnp.max(jnp.abs(fn(*fargs) - ref)))
            rows.append(dict(bits=bits, path=name, ms=round(ms, 4), gb_per_s=round(read / ms / 1e6, 1),
                             max_abs_vs_xla=err))
            print(f"{bits}-bit  {name:24s} {ms:9.3f} ms  {read / ms / 1e6:8.1f} GB/s", flush=True)
    meta = dict(device=str(jax.devices()[0]), jax=jax.__version__, batch=b, slots=n, heads="28/4", head_dim=d,
                group=group, smoke=args.smoke, time=time.strftime("%Y-%m-%d %H:%M:%S"),
                commit=subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip())
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(f"# Quantised decode attention ({meta['device']}, jax {meta['jax']}, batch {b}, {n} slots, "
                    f"28/4 heads, head_dim {d})\n\n| bits | path | ms | GB/s read |\n| --- | --- | --- | --- |\n")
            f.writelines(f"| {r['bits']} | {r['path']} | {r['ms']} | {r['gb_per_s']} |\n" for r in rows)


if __name__ == "__main__":
    main()
