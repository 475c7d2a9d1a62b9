"""``purekv bench speed``: our dense cache, PureKV and PureKV + ST-SpAttn next to transformers, one table.

For every video prompt and round, every configuration runs in a FRESH process (:mod:`.ours`,
:mod:`.standalone` for transformers) that loads the same checkpoint, compiles / warms up once and then times
``reps`` ``generate`` calls; the configurations' order rotates from round to round so that a shared machine's
load falls on all of them alike. The table gives medians over every timed call of every round (prefill =
time to the first token, decode tokens/s), the compile time apart (median over rounds), and each process's
peak resident memory (median over rounds). Results: a JSON file, a markdown table and a plot.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile

import jax
import numpy as np
from tqdm.auto import tqdm

from models.qwen2_5_vl import init_params, save_hf_checkpoint

from . import standalone
from .model import BENCH_VOCAB, bench_small_config, video_prompt

#: configuration name -> its row label.
CONFIGS = {
    "dense": "ours, full cache",
    "purekv": "ours, PureKV",
    "purekv_st": "ours, PureKV + ST-SpAttn (auto)",
    "hf": "transformers (sdpa), full cache",
}

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIB = 2**20


class SpeedBenchError(RuntimeError):
    """A worker process failed (its stderr's tail is in the message)."""


@dataclasses.dataclass(frozen=True)
class SpeedSettings:
    """What ``purekv bench speed`` runs: ``grids`` the prompts' merged video grids ``(t, h, w)``; ``new`` tokens
    generated per call; ``rounds`` fresh processes per configuration and prompt; ``reps`` timed calls per
    process; ``budget`` PureKV's budget; ``patterns`` a ``purekv calibrate`` file for the ST row (None: the
    union pattern); ``configs`` the rows (``hf`` is dropped when transformers is not installed); ``cores``
    the CPUs each worker is pinned to (the first ``cores`` this process may use; 0: all of them), so that
    both libraries size their thread pools alike."""

    grids: tuple[tuple[int, int, int], ...] = ((2, 8, 8),)
    new: int = 32
    rounds: int = 2
    reps: int = 2
    budget: float = 0.2
    patterns: str | None = None
    configs: tuple[str, ...] = tuple(CONFIGS)
    vocab: int = BENCH_VOCAB
    cores: int = 1


def transformers_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def write_inputs(folder: str, settings: SpeedSettings) -> tuple[str, list[str]]:
    """Writes the bench-small checkpoint (random weights, Hub names) and one prompt file per grid into
    ``folder``; returns ``(checkpoint folder, prompt files)``."""
    config = bench_small_config(settings.vocab)
    ckpt = save_hf_checkpoint(os.path.join(folder, "bench-small"), config, init_params(config, jax.random.key(0)))
    prompts = []
    for grid in settings.grids:
        p = video_prompt(config, grid)
        path = os.path.join(folder, "prompt_{}x{}x{}.npz".format(*grid))
        np.savez(path, **{k: getattr(p, k) for k in standalone.PROMPT_FIELDS})
        prompts.append(path)
    return str(ckpt), prompts


def worker_cpus(cores: int) -> list[int] | None:
    """The CPUs a worker pins itself to (None: not pinned)."""
    if cores == 0 or not hasattr(os, "sched_getaffinity"):
        return None
    return sorted(os.sched_getaffinity(0))[:cores]


def run_worker(spec: dict) -> dict:
    """One configuration in a fresh process; its JSON result."""
    if spec["config"] == "hf":
        cmd = [sys.executable, standalone.__file__, json.dumps(spec)]
    else:
        cmd = [sys.executable, "-m", "purekv_jax.speed.ours", json.dumps(spec)]
    path = os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise SpeedBenchError(f"the {spec['config']} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_speed_bench(settings: SpeedSettings, progress: bool = True) -> dict:
    """Runs every (prompt, round, configuration) in a fresh process; returns the raw results and summary."""
    configs = [c for c in settings.configs if c != "hf" or transformers_installed()]
    raw = []
    with tempfile.TemporaryDirectory(prefix="purekv-speed-") as tmp:
        ckpt, prompts = write_inputs(tmp, settings)
        jobs = [(grid, path, r, c) for grid, path in zip(settings.grids, prompts) for r in range(settings.rounds)
                for c in configs[r % len(configs):] + configs[:r % len(configs)]]
        for grid, path, r, c in tqdm(jobs, desc="purekv bench speed", unit="process", disable=not progress,
                                     file=sys.stderr, dynamic_ncols=True):
            spec = dict(config=c, checkpoint=ckpt, prompt=path, new=settings.new, reps=settings.reps,
                        budget=settings.budget, patterns=settings.patterns, cpus=worker_cpus(settings.cores))
            raw.append(dict(run_worker(spec), grid=list(grid), round=r))
    return dict(settings=dataclasses.asdict(settings), configs=configs, machine=machine(), raw=raw,
                summary=summarize(raw, configs, settings.grids))


def machine() -> dict:
    return dict(cpus=os.cpu_count(), jax=jax.__version__, backend=jax.default_backend(), python=sys.version.split()[0])


def summarize(raw: list[dict], configs: list[str], grids) -> list[dict]:
    """One row per (prompt, configuration): medians over every timed call and every round."""
    rows = []
    for grid in grids:
        for c in configs:
            res = [r for r in raw if r["config"] == c and tuple(r["grid"]) == tuple(grid)]
            calls = [run for r in res for run in r["runs"]]
            n = res[0]["prompt_len"]
            prefill = statistics.median(x["prefill_s"] for x in calls)
            decode_rate = statistics.median(x["decode_tokens"] / x["decode_s"] for x in calls)
            row = dict(grid=list(grid), prompt_len=n, config=c, label=CONFIGS[c], calls=len(calls),
                       prefill_s=prefill, prefill_min_s=min(x["prefill_s"] for x in calls),
                       prefill_tok_s=n / prefill, decode_tok_s=decode_rate,
                       compile_s=statistics.median(r["compile_s"] for r in res),
                       load_s=statistics.median(r["load_s"] for r in res),
                       peak_rss=statistics.median(r["peak_rss"] for r in res),
                       rss_loaded=statistics.median(r["rss_loaded"] for r in res),
                       rss_imports=statistics.median(r["rss_imports"] for r in res))
            for key in ("kv_bytes_kept", "kv_bytes_allocated", "prefill_program_peak", "st_paths"):
                if key in res[0]:
                    row[key] = res[0][key]
            rows.append(row)
    for row in rows:
        same = {r["config"]: r for r in rows if r["grid"] == row["grid"]}
        row["prefill_vs_dense"] = same["dense"]["prefill_s"] / row["prefill_s"] if "dense" in same else None
        hf = same.get("hf")
        row["prefill_vs_hf"] = hf["prefill_s"] / row["prefill_s"] if hf else None
        row["decode_vs_hf"] = row["decode_tok_s"] / hf["decode_tok_s"] if hf else None
        row["peak_vs_hf"] = row["peak_rss"] / hf["peak_rss"] if hf else None
    return rows


def st_choice(row: dict) -> str:
    """The ST row's path per pattern set (``sparse`` / ``dense``), from ``stats["st_paths"]``."""
    paths = row.get("st_paths") or []
    return "/".join(sorted({p["path"] for p in paths})) if paths else ""


def markdown_table(out: dict) -> str:
    """The side-by-side table (one line per prompt and configuration)."""
    fmt = lambda x, f: "-" if x is None else format(x, f)
    lines = ["| prompt | configuration | prefill s | prefill x dense | prefill x HF | decode tok/s | decode x HF | "
             "compile s | peak RSS MiB | peak x HF | KV kept MiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in out["summary"]:
        label = r["label"] + (f" [{st_choice(r)}]" if r["config"] == "purekv_st" else "")
        kv = r.get("kv_bytes_kept")
        lines.append(
            f"| {r['prompt_len']:,} tok ({'x'.join(map(str, r['grid']))} video) | {label} | {r['prefill_s']:.3f} | "
            f"{fmt(r['prefill_vs_dense'], '.2f')} | {fmt(r['prefill_vs_hf'], '.2f')} | {r['decode_tok_s']:.1f} | "
            f"{fmt(r['decode_vs_hf'], '.2f')} | {r['compile_s']:.1f} | {r['peak_rss'] / MIB:,.0f} | "
            f"{fmt(r['peak_vs_hf'], '.2f')} | {'-' if kv is None else format(kv / MIB, '.1f')} |")
    return "\n".join(lines)


def plot(out: dict, path: str) -> None:
    """Prefill time, decode tokens/s and peak RSS per configuration, one group of bars per prompt."""
    import matplotlib  # optional (the ``test`` extra): only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, configs = out["summary"], out["configs"]
    prompts = list(dict.fromkeys(r["prompt_len"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(configs)
    for j, (key, title, scale) in enumerate((("prefill_s", "prefill (time to first token), s", 1.0),
                                            ("decode_tok_s", "decode tokens/s", 1.0),
                                            ("peak_rss", "process peak RSS, MiB", 1 / MIB))):
        ax = axes[j]
        for i, c in enumerate(configs):
            vals = [next(r[key] for r in rows if r["prompt_len"] == n and r["config"] == c) * scale for n in prompts]
            ax.bar(np.arange(len(prompts)) + i * width, vals, width, label=CONFIGS[c])
        ax.set_xticks(np.arange(len(prompts)) + width * (len(configs) - 1) / 2, [f"{n:,} tok" for n in prompts])
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_results(out: dict, folder: str, command: str) -> dict[str, str]:
    """Writes ``speed.json``, ``speed_table.md`` (the command and the table) and ``speed.png`` into ``folder``,
    each through a temporary file and an atomic rename."""
    os.makedirs(folder, exist_ok=True)
    paths = {k: os.path.join(folder, v) for k, v in (("json", "speed.json"), ("md", "speed_table.md"),
                                                    ("plot", "speed.png"))}
    out = dict(out, command=command)
    texts = {"json": json.dumps(out, indent=1), "md": f"`{command}`\n\n{markdown_table(out)}\n"}
    for key, text in texts.items():
        tmp = paths[key] + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, paths[key])
    plot(out, paths["plot"])
    return paths
