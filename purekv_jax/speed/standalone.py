"""The transformers side of ``purekv bench speed``, run as a script so that its process never imports jax or
``purekv_jax`` (its peak memory is transformers' own), plus the helpers both sides' workers share.

    python purekv_jax/speed/standalone.py '{"checkpoint": DIR, "prompt": FILE.npz, "new": 32, "reps": 3}'

Loads the checkpoint with ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` (float32, sdpa attention),
runs ``model.generate`` once (warm-up) and ``reps`` timed times, and prints one JSON line. ``prefill_s`` is
the time from the call to the first logits-processor call (everything before the first token);
decode tokens/s is the later logits-processor calls over their span. This module imports only numpy at its top.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np

#: the arrays of a prompt file (``np.savez``), the keyword names of both models' inputs.
PROMPT_FIELDS = ("input_ids", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def memory_status(keys: tuple[str, ...] = ("VmRSS", "VmHWM")) -> dict[str, int]:
    """This process's memory figures from Linux's ``/proc/self/status`` in bytes: by default the resident memory
    now (``VmRSS``) and its peak so far (``VmHWM``); elsewhere both from ``ru_maxrss`` (the peak)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in keys:
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = {k: peak for k in keys}
    return out


def pin_to(cpus: list[int] | None) -> None:
    """Pins this process to ``cpus`` (None or where unsupported: left alone). Called before jax's CPU client
    or torch starts, so that both size their thread pools to the same cores."""
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


def load_prompt(path: str) -> dict[str, np.ndarray]:
    """A prompt file's arrays (:data:`PROMPT_FIELDS`)."""
    with np.load(path) as f:
        return {k: f[k] for k in PROMPT_FIELDS}


def emit(spec: dict, result: dict) -> None:
    """Prints a worker's result as one JSON line (with the spec's configuration and the process peak)."""
    result.update(config=spec["config"], peak_rss=memory_status()["VmHWM"], pid=os.getpid())
    print(json.dumps(result), flush=True)


def run_transformers(spec: dict) -> dict:
    """Loads ``spec["checkpoint"]`` with transformers and times ``generate`` on ``spec["prompt"]``."""
    pin_to(spec.get("cpus"))
    import torch  # optional dependency: only this configuration needs it
    import transformers

    class Stamps(transformers.LogitsProcessor):
        """Records the time of every call: one per generated token, the first right after the prefill."""

        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    prompt = load_prompt(spec["prompt"])
    before = memory_status()
    t0 = time.perf_counter()
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        spec["checkpoint"], dtype=torch.float32, attn_implementation="sdpa").eval()
    load_s = time.perf_counter() - t0
    loaded = memory_status()
    ids = prompt["input_ids"].astype(np.int64)
    inputs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.int64),
                  pixel_values_videos=torch.from_numpy(prompt["pixel_values_videos"]),
                  video_grid_thw=torch.from_numpy(prompt["video_grid_thw"].astype(np.int64)),
                  second_per_grid_ts=torch.from_numpy(prompt["second_per_grid_ts"]))
    new = spec["new"]

    def once() -> dict:
        stamps = Stamps()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                           logits_processor=transformers.LogitsProcessorList([stamps]))
        ts = stamps.times
        return dict(prefill_s=ts[0] - t0, decode_s=ts[-1] - ts[0], decode_tokens=len(ts) - 1)

    warm = once()
    runs = [once() for _ in range(spec["reps"])]
    return dict(rss_imports=before["VmRSS"], rss_loaded=loaded["VmRSS"], load_s=load_s, compile_s=0.0,
                first_call_s=warm["prefill_s"] + warm["decode_s"], runs=runs, prompt_len=int(ids.shape[1]),
                threads=torch.get_num_threads())


if __name__ == "__main__":
    SPEC = json.loads(sys.argv[1])
    emit(SPEC, run_transformers(SPEC))
