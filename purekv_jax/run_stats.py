"""A generate run's stats for people: decode tokens per second and the one-line summary the commands print."""

from __future__ import annotations

from .requests import PromptInfo

MIB = 1 << 20


def decode_rate(stats: dict) -> float | None:
    """Decode tokens per second: one layer-stack step per token after the first (sampled from the prefill);
    ``None`` when nothing was decoded."""
    steps, secs = stats.get("decode_steps", 0), stats.get("decode_s", 0.0)
    return steps / secs if steps and secs > 0 else None


def format_stats(stats: dict, info: PromptInfo | None = None, label: str | None = None) -> str:
    """One line: prefill time, decode tokens/s, KV MiB full vs kept, prompt tokens, the policy's label,
    compile time."""
    rate = decode_rate(stats)
    full, kept = stats["kv_bytes_full"] / MIB, stats["kv_bytes_kept"] / MIB
    pct = 100 * stats["kv_bytes_kept"] / max(stats["kv_bytes_full"], 1)
    parts = [
        f"prefill {stats['prefill_s']:.3f} s",
        f"decode {rate:.1f} tok/s ({stats.get('generated_tokens', stats['decode_steps'] + 1)} tokens)"
        if rate else f"decode {stats.get('generated_tokens', 1)} token(s)",
        f"KV {full:.2f} MiB full vs {kept:.2f} MiB kept ({pct:.0f}%)",
    ]
    if info is not None:
        media = [f"{info.video_tokens} video" if info.video_tokens else "",
                 f"{info.image_tokens} image" if info.image_tokens else ""]
        media = ", ".join(m for m in media if m)
        parts.append(f"prompt {info.tokens} tokens" + (f" ({media})" if media else ""))
    if label:
        parts.append(label)
    parts.append(f"compile {stats['prefill_compile_s'] + stats['decode_compile_s']:.1f} s")
    return " | ".join(parts)


def format_plan(stats: dict) -> str:
    """The resolved plan behind a run, a few lines for ``--verbose``: the prompt and its bucket, the
    per-layer budgets and cache slots, and ST-SpAttn's path per pattern set with the cost model's
    predicted seconds of each path."""
    budgets = stats["budgets"]
    same = len(set(budgets)) == 1
    lines = [f"plan: prompt {stats['prompt_len']} tokens padded to {stats['padded_len']}; "
             f"budget {budgets[0] if same else list(budgets)} tokens per layer and KV head"
             f"{'' if same else ' (per layer)'}; cache {stats['capacity']} slots"]
    for path in stats.get("st_paths", []):
        layers = path["layers"]
        if len(layers) == 1:
            span = f"layer {layers[0]}"
        elif layers == list(range(layers[0], layers[-1] + 1)):
            span = f"layers {layers[0]}-{layers[-1]}"
        else:
            span = f"layers {layers}"
        cost = "" if path["sparse_s"] is None else (
            f" (predicted per layer: sparse {path['sparse_s'] * 1e3:.1f} ms, dense {path['dense_s'] * 1e3:.1f} ms)")
        note = f" ({path['note']})" if path.get("note") and path["sparse_s"] is None else ""
        lines.append(f"ST-SpAttn {span}, {'/'.join(path['patterns'])} heads: {path['path']}{cost}{note}")
        if path["path"] == "mixed":
            lines.append("  " + "; ".join(f"{g['pattern']} heads {g['heads']}: {g['path']}" for g in path["groups"]))
    return "\n".join(lines)
