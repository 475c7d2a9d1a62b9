"""Needle retrieval on the real LM: does a compressed cache keep the fact a question needs?

A prompt of exactly ``N`` tokens in SmolLM2's chat format::

    <|im_start|>system ... <|im_end|>\\n<|im_start|>user\\n
    [real text (Shakespeare / Britannica) ... FACT ... real text]            <- the fact at depth 20-90%
    \\n\\nWhat is the secret code (a four-digit number)?<|im_end|>\\n<|im_start|>assistant\\nThe secret code is

with FACT = ``"\\nThe secret code is 4817.\\n"`` (a seeded 4-digit code). The answer (greedy, <= 8 tokens) is
decoded from each policy's compressed cache; accuracy = the code appears in the decoded answer.

Method (as the perplexity harness, ``harness.py``): one dense **analysis prefill** per batch of prompts keeps
every layer's keys / values, every needed base score (the project's policy objects) and the last position's
logits. Pruning never changes the prefill's hidden states, so each policy's cache is exactly what
``generate``'s active prefill writes (``resolve`` -> per-layer scores (own / anchor / CLIE-owned) ->
``policies.keep_set``, AdaKV included; the carry is the prefill's own, :func:`purekv_jax.prefill.carried_score`) and the first answer token is the full model's. The remaining tokens
come from ``generate``'s own decode program (:func:`purekv_jax.decode.decode_program`) on that cache.
``tests/test_retrieval.py`` checks the answers against ``generate`` itself.

Command: ``python -m purekv_jax.fidelity.retrieval --prompts 30 --out docs/retrieval``; ``--kv-dtype bfloat16``
stores the caches in bfloat16 (byte budgets count in it; docs/kv_bytes.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np


from .. import cache as C
from ..config import KVPlan, PureKVConfig
from ..decode import SamplingSettings, decode_program
from ..presets import preset
from .data import DEFAULT_SOURCES, read_text
from .model import load_model
from .harness import analysis_prefill, build_cache, carried_layers, score_policies_needed as base_policies

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
USER = "<|im_start|>user\n"
FACT = "\nThe secret code is {code}.\n"
#: the question tails tried (question, end of the user turn, start of the assistant turn); the first is the
#: one the full cache answers best (docs/retrieval.md gives each one's full-cache accuracy).
QUESTIONS = (
    "\n\nWhat is the secret code (a four-digit number)?<|im_end|>\n<|im_start|>assistant\nThe secret code is",
    "\n\nWhat is the secret code?<|im_end|>\n<|im_start|>assistant\nThe secret code is",
    "\n\nWhat is the secret code mentioned in the text above?<|im_end|>\n<|im_start|>assistant\nThe secret code is",
    "\n\nWhat is the secret code?<|im_end|>\n<|im_start|>assistant\n",
)


@dataclasses.dataclass(frozen=True)
class RetrievalPrompt:
    ids: np.ndarray  # [N] int32
    code: str
    depth: float  # fact position / context length
    fact_pos: int  # token index of the fact's first token
    source: str
    question_len: int  # tokens after the context (question + chat suffix)


def question_ids(tokenizer, question: str = QUESTIONS[0]) -> list[int]:
    return tokenizer.encode(question)


def make_prompts(tokenizer, n_tokens: int, n_prompts: int, seed: int = 0, question: str = QUESTIONS[0],
                 sources=DEFAULT_SOURCES) -> list[RetrievalPrompt]:
    """``n_prompts`` prompts of exactly ``n_tokens`` tokens; code, depth and text offset drawn from ``seed``."""
    rng = np.random.default_rng([seed, n_tokens])
    head = tokenizer.encode(SYSTEM + USER)
    tail = question_ids(tokenizer, question)
    out = []
    for i in range(n_prompts):
        rel = sources[i % len(sources)]
        text = read_text(rel)
        code = str(int(rng.integers(1000, 10000)))
        depth = float(rng.uniform(0.2, 0.9))
        fact = tokenizer.encode(FACT.format(code=code))
        n_ctx = n_tokens - len(head) - len(tail) - len(fact)
        chars = 8 * n_ctx
        start = int(rng.integers(len(text) // 10, len(text) - chars))
        start = text.find("\n", start) + 1 or start
        ctx = tokenizer.encode(text[start : start + chars])[:n_ctx]
        if len(ctx) < n_ctx:
            raise ValueError(f"{rel}: too few tokens at offset {start}")
        cut = int(round(depth * n_ctx))
        ids = np.asarray(head + ctx[:cut] + fact + ctx[cut:] + tail, np.int32)
        assert len(ids) == n_tokens
        out.append(RetrievalPrompt(ids=ids, code=code, depth=cut / n_ctx, fact_pos=len(head) + cut,
                                   source=rel, question_len=len(tail)))
    return out


# ------------------------------------------------------------------------------------------ device parts
def decode_answers(params, config, cache, logits, max_new: int):
    """Greedy tokens ``[B, max_new]`` from ``cache`` with ``generate``'s decode program (donates the cache)."""
    eos = tuple(config.eos_token_id)
    sampling = SamplingSettings(n_tokens=max_new, eos=eos, pad_id=eos[0])
    program, args = decode_program(params, cache, logits, max_new, 0, cfg=config.text, sampling=sampling)
    return np.asarray(program.run(*args).tokens)


def policy_answers(params, config, an: dict, pk: PureKVConfig | None, max_new: int):
    """``(tokens [B, max_new], kept fraction, held [L, B, Hkv, N], bytes fraction)`` for one policy on an
    analysed batch (byte budgets counted in the analysis' key / value dtype)."""
    cfg = config.text
    k, v, table, logits = an["k"], an["v"], an["table"], an["logits"]
    n = k.shape[3]
    if pk is None:
        plan = KVPlan.full(cfg.num_hidden_layers, n)
        scores, budgets = jnp.zeros(k.shape[:4], jnp.float32), None
    else:
        plan = pk.resolve(cfg, n, kv_dtype=k.dtype)
        scores, budgets = carried_layers(plan, table, v)
    cache, idx, kept = build_cache(scores, k, v, an.get("window_len"), budgets, plan=plan,
                                   capacity=plan.slots + max_new)
    kept_np = np.asarray(kept).sum() / (cfg.num_hidden_layers * k.shape[2] * n * k.shape[1])
    full_bytes = C.kv_bytes_full(n * k.shape[1], cfg.num_hidden_layers, k.shape[2], cfg.head_dim, k.dtype)
    bytes_kept = C.kv_bytes_kept(cache) / full_bytes
    toks = decode_answers(params, config, cache, logits, max_new)  # (donates the cache)
    # fraction of (layer, head) caches holding every token of the fact (per row)
    hold = np.zeros((cfg.num_hidden_layers, k.shape[1], k.shape[2], n), bool)
    np.put_along_axis(hold, np.asarray(idx), np.asarray(kept), axis=-1)
    return toks, float(kept_np), hold, bytes_kept


# ------------------------------------------------------------------------------------------ policies
#: The study's rows (presets of :mod:`purekv_jax.presets`), in the order of its tables; every one is
#: flash-compatible (H2O is left out: it needs the N x N matrix).
RETRIEVAL_POLICIES = (
    "full", "streaming", "snapkv", "pyramidkv", "clie (paper, anchor 2)", "clie anchor 2, no vnorm", "clie anchor 8",
    "clie anchor 15", "clie anchor 15, no vnorm", "clie every 2", "clie every 2, no vnorm", "clie every 4",
    "snapkv adakv", "snapkv qwin", "snapkv adakv qwin", "snapkv qwin, max pool", "snapkv qwin, no pool",
    "snapkv qwin, pool 15", "snapkv qwin, pool 11", "snapkv qwin, pool 21", "snapkv qwin, pool 31",
    "snapkv qwin, pool 63", "snapkv qwin, max pool 15", "snapkv qwin adakv, pool 15", "pyramidkv qwin, pool 15",
    "pyramidkv qwin", "snapkv max pool", "snapkv pool 15", "clie every 2 adakv", "default PureKVConfig()",
    "purekv_bytes", "purekv_bytes_int8", "purekv_bytes_int4", "purekv_bytes_int2", "purekv_bytes_auto",
)


def policy_grid(n_layers: int, names=None) -> dict[str, Callable[[float], PureKVConfig | None]]:
    """name -> ``make(budget) -> PureKVConfig | None`` for a model of ``n_layers`` layers: ``full`` and the
    presets called ``names`` (any preset; an unknown name raises), or every row of :data:`RETRIEVAL_POLICIES`."""
    chosen = RETRIEVAL_POLICIES if names is None else ("full", *(n for n in names if n != "full"))
    return {name: functools.partial(preset(name).make, n_layers=n_layers) for name in chosen}


def run_retrieval(params, config, tokenizer, lengths=(1024, 2048), budgets=(0.1, 0.2, 0.4), prompts: int = 30,
                  batch: int = 6, max_new: int = 8, seed: int = 0, names=None, question: str = QUESTIONS[0],
                  kv_dtype=None, log=print) -> dict:
    """Every (length, policy, budget) over ``prompts`` prompts per length -> a JSON-able dict; ``kv_dtype``:
    the dtype the caches' keys and values are stored in (None: the model's)."""
    t_start = time.perf_counter()
    cfg = config.text
    rows: dict = {}
    answers: dict = {}
    for n in lengths:
        ps = make_prompts(tokenizer, n, prompts, seed=seed, question=question)
        grid = policy_grid(cfg.num_hidden_layers, names)
        entries = [(name, b, make(b)) for name, make in grid.items() for b in ((1.0,) if name == "full" else budgets)]
        pols = base_policies([c for _, _, c in entries])
        for s in range(0, len(ps), batch):
            chunk = ps[s : s + batch]
            ids = jnp.asarray(np.stack([p.ids for p in chunk]), jnp.int32)
            # the question-aligned window (generate(question_len=...)): the tokens after the context
            wl = jnp.asarray([p.question_len for p in chunk], jnp.int32)
            k, v, scores, logits = analysis_prefill(params, ids, wl, cfg=cfg, score_policies=pols)
            if kv_dtype is not None:
                k, v = k.astype(kv_dtype), v.astype(kv_dtype)
            an = dict(k=k, v=v, table=dict(zip(pols, scores)), logits=logits, window_len=wl)
            for name, b, pk in entries:
                toks, kept_frac, hold, bytes_frac = policy_answers(params, config, an, pk, max_new)
                row = rows.setdefault((n, name, b), {"n_prompt": n, "policy": name, "budget": b, "correct": [],
                                                      "fact_kept": [], "kept_fraction": [], "bytes_fraction": []})
                row["kept_fraction"].append(kept_frac)
                row["bytes_fraction"].append(bytes_frac)
                for r, p in enumerate(chunk):
                    text = tokenizer.decode(toks[r])
                    row["correct"].append(bool(p.code in text))
                    fl = len(tokenizer.encode(FACT.format(code=p.code)))
                    # code digits sit at fact_pos+6 .. fact_pos+fl-3 (after "\nThe secret code is", before ".\n")
                    row["fact_kept"].append(float(hold[:, r, :, p.fact_pos + 6 : p.fact_pos + fl - 2].all(-1).mean()))
                    answers.setdefault(f"{n}/{name}/{b}", []).append(text)
            log(f"[retrieval] N={n} prompts {s + 1}-{s + len(chunk)} done, {time.perf_counter() - t_start:.0f} s")
    results = []
    for row in rows.values():
        results.append({**{k_: row[k_] for k_ in ("n_prompt", "policy", "budget")},
                        "accuracy": float(np.mean(row["correct"])), "correct": row["correct"],
                        "code_kept": float(np.mean(row["fact_kept"])),
                        "kept_fraction": float(np.mean(row["kept_fraction"])),
                        "bytes_fraction": float(np.mean(row["bytes_fraction"]))})
    return {"settings": dict(lengths=list(lengths), budgets=list(budgets), prompts=prompts, max_new=max_new,
                             seed=seed, question=question, kv_dtype=kv_dtype),
            "results": results, "answers": answers, "total_s": round(time.perf_counter() - t_start, 1)}


def markdown(out: dict) -> str:
    budgets = out["settings"]["budgets"]
    lines = []
    for n in out["settings"]["lengths"]:
        res = [r for r in out["results"] if r["n_prompt"] == n]
        full = next(r for r in res if r["policy"] == "full")
        k = len(full["correct"])
        lines += [f"### Prompt {n} tokens ({k} prompts; full cache: {full['accuracy']:.2f})", "",
                  "| policy | " + " | ".join(f"{int(b * 100)}% acc (code kept)" for b in budgets) + " |",
                  "| --- |" + " --- |" * len(budgets)]
        names = list(dict.fromkeys(r["policy"] for r in res if r["policy"] != "full"))
        for name in names:
            cells = []
            for b in budgets:
                r = next((r for r in res if r["policy"] == name and r["budget"] == b), None)
                cells.append("--" if r is None else f"{r['accuracy']:.2f} ({r['code_kept']:.2f})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def paired_markdown(outs: list[dict], ref: str = "snapkv") -> str:
    """Per policy and budget, paired against ``ref`` on the same prompts: ``+a/-b`` = prompts the policy gets
    right and ``ref`` wrong / the reverse. ``outs``: one result dict per prompt length."""
    budgets = outs[0]["settings"]["budgets"]
    cols = [(o["settings"]["lengths"][0], b) for o in outs for b in budgets]
    rows: dict[str, dict] = {}
    for o in outs:
        res = {(r["policy"], r["budget"]): np.asarray(r["correct"]) for r in o["results"]}
        n = o["settings"]["lengths"][0]
        for (name, b), c in res.items():
            if name in ("full", ref) or (ref, b) not in res:
                continue
            base = res[(ref, b)]
            rows.setdefault(name, {})[(n, b)] = f"+{int((c & ~base).sum())}/-{int((base & ~c).sum())}"
    head = "| policy | " + " | ".join(f"{n:,}: {int(b * 100)}%" for n, b in cols) + " |"
    lines = [head, "| --- |" + " --- |" * len(cols)]
    for name, cells in rows.items():
        lines.append(f"| {name} | " + " | ".join(cells.get(c, "--") for c in cols) + " |")
    return "\n".join(lines)


def merge_runs(outs: list[dict], rename: dict[str, str] | None = None) -> dict:
    """One result dict from several runs on the same prompts (same length, seed and question): results and
    answers concatenated, a (length, policy, budget) row kept from the first run holding it; ``rename`` maps
    a run's policy names to the merged table's (e.g. a past default to what it was)."""
    rename = rename or {}
    first = outs[0]["settings"]
    for o in outs[1:]:
        s = o["settings"]
        if (s["lengths"], s["prompts"], s["seed"], s["question"]) != (first["lengths"], first["prompts"],
                                                                      first["seed"], first["question"]):
            raise ValueError(f"runs on other prompts cannot be merged: {s} vs {first}")
    seen, results, answers = set(), [], {}
    for o in outs:
        for r in o["results"]:
            r = {**r, "policy": rename.get(r["policy"], r["policy"])}
            key = (r["n_prompt"], r["policy"], r["budget"])
            if key not in seen:
                seen.add(key)
                results.append(r)
        for k, v in o["answers"].items():
            n, name, b = k.split("/", 2)
            answers.setdefault(f"{n}/{rename.get(name, name)}/{b}", v)
    budgets = sorted({b for o in outs for b in o["settings"]["budgets"]})
    return {"settings": {**first, "budgets": budgets}, "results": results, "answers": answers,
            "total_s": round(sum(o["total_s"] for o in outs), 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--question", type=int, default=0, help="index into QUESTIONS")
    ap.add_argument("--policies", nargs="*", default=None)
    ap.add_argument("--kv-dtype", default=None, help="store the caches in this dtype (e.g. bfloat16; byte "
                                                     "budgets count in it); default: the model's")
    ap.add_argument("--out", default="docs/retrieval")
    ap.add_argument("--tag", default="retrieval")
    a = ap.parse_args(argv)
    config, params, tok = load_model()
    out = run_retrieval(params, config, tok, tuple(a.lengths), tuple(a.budgets), a.prompts, a.batch,
                        question=QUESTIONS[a.question], names=a.policies, kv_dtype=a.kv_dtype)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"{a.tag}.json"), "w") as f:
        json.dump(out, f, indent=1)
    md = markdown(out)
    with open(os.path.join(a.out, f"{a.tag}.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"total {out['total_s']} s")


if __name__ == "__main__":
    main()


def plot(jsons: list[str], png: str, names=None, highlight: str | None = None) -> None:
    """Accuracy against budget, one panel per prompt length, one line per policy (``names``: these only;
    full cache dashed; ``highlight``: drawn bold, labelled as the default)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outs = [json.load(open(p)) for p in jsons]
    fig, axes = plt.subplots(1, len(outs), figsize=(6 * len(outs), 4.5), squeeze=False)
    for ax, out in zip(axes[0], outs):
        n = out["settings"]["lengths"][0]
        res = out["results"]
        cmap = plt.get_cmap("tab20")
        for i, name in enumerate(dict.fromkeys(r["policy"] for r in res if names is None or r["policy"] in names
                                                or r["policy"] == "full")):
            rs = sorted((r for r in res if r["policy"] == name), key=lambda r: r["budget"])
            if name == "full":
                ax.axhline(rs[0]["accuracy"], color="k", ls="--", label="full cache")
                continue
            bold = name == highlight
            ax.plot([r["budget"] * 100 for r in rs], [r["accuracy"] for r in rs], marker="o",
                    label=f"{name} (default)" if bold else name, color="k" if bold else cmap(i % 20),
                    lw=2.5 if bold else 1.5, zorder=3 if bold else 2)
        ax.set(title=f"needle retrieval, {n}-token prompts ({len(res[0]['correct'])} prompts)",
               xlabel="KV budget (% of prompt)", ylabel="accuracy", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
