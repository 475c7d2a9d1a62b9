"""The method on VideoLLaMA2 through the model interface: greedy ``generate`` equals a transformers reference
loop, every CLI policy runs and keeps 5x less KV at a 20% budget, ST-SpAttn equals the dense masked
reference, and the method's modules hold no model-specific branch."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

from models.qwen2_5_vl.layers import dense_attention
from models.videollama2 import expand_placeholders, load_checkpoint, tiny_config
from purekv_jax import generation as G
from purekv_jax.config import PureKVConfig
from purekv_jax.fidelity import analyse_prompt, continuation_logits, policy_cache
from purekv_jax.presets import CLI_POLICIES, build_policy
from purekv_jax.st_sparse import HeadPattern, STLayout, VideoSpan, reference_mask
from purekv_jax.st_sparse.prefill import row_layouts

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from videollama2_reference import reference_prompt_embeds, write_reference_folder  # noqa: E402

N_NEW = 6


@pytest.fixture(scope="module")
def vl2(tmp_path_factory):
    """A tiny Mistral + CLIP VideoLLaMA2 of 3 layers (8 frames -> a 5 x 3 x 3 token grid), its torch parts
    and a 160-token video prompt."""
    cfg = tiny_config(num_hidden_layers=3, num_frames=8)
    folder = tmp_path_factory.mktemp("vl2_gen")
    tower, connector, lm = write_reference_folder(cfg, folder)
    _, params = load_checkpoint(folder)
    rng = np.random.default_rng(0)
    pix = rng.standard_normal((cfg.num_frames, 3, 56, 56)).astype(np.float32)
    before, after = rng.integers(3, cfg.text.vocab_size, 60), rng.integers(3, cfg.text.vocab_size, 55)
    side = cfg.vision.patches_per_side
    grid = ((cfg.num_frames, side, side),)
    ids = expand_placeholders(np.r_[before, cfg.video_token_index, after], cfg, video_grid=grid)[None]
    assert ids.shape[1] == 160
    return dict(cfg=cfg, params=params, torch=(tower, connector, lm), pix=pix, before=before, after=after,
                grid=grid, ids=ids)


def test_greedy_generate_equals_transformers_loop(vl2):
    cfg, (tower, connector, lm) = vl2["cfg"], vl2["torch"]
    embeds = reference_prompt_embeds(tower, connector, lm, cfg, vl2["pix"], vl2["before"], vl2["after"])
    expected = []
    with torch.no_grad():
        for _ in range(N_NEW):
            nxt = int(lm(inputs_embeds=embeds).logits[0, -1].argmax())
            expected.append(nxt)
            embeds = torch.cat([embeds, lm.get_input_embeddings()(torch.tensor([[nxt]]))], dim=1)
    got = G.generate(vl2["params"], cfg, vl2["ids"], pixel_values_videos=vl2["pix"], video_grid_thw=vl2["grid"],
                     max_new_tokens=N_NEW, eos_token_id=())
    assert got.tokens[0].tolist() == expected


@pytest.mark.parametrize("name", [p for p in CLI_POLICIES if p != "full"])
def test_every_policy_keeps_a_fifth(vl2, name):
    policy = build_policy(name, 0.2, window=8, sink=2, anchors=(1,))
    got = G.generate(vl2["params"], vl2["cfg"], vl2["ids"], pixel_values_videos=vl2["pix"],
                     video_grid_thw=vl2["grid"], policy=policy, max_new_tokens=2, eos_token_id=(),
                     attention="dense" if name == "h2o" else "auto")
    assert got.tokens.shape == (1, 2)
    assert abs(got.stats["kv_compression"] - 5.0) < 0.05, got.stats["kv_compression"]


def test_st_sparse_equals_dense_masked_reference(vl2):
    """ST-SpAttn's block-sparse prefill (one ST layer holding all four head patterns: one kernel compile)
    against dense attention under the explicit METHOD.md mask of the connector's (t', h', w') grid, same
    kept cache and tokens."""
    cfg, params = vl2["cfg"], vl2["params"]
    T, S, U, D = HeadPattern.TEMPORAL, HeadPattern.SPATIAL, HeadPattern.UNION, HeadPattern.DENSE
    pats = (None, None, (T, S, U, D))
    pol = PureKVConfig(budget=1.0, cross_layer=False, st_sparse=True, head_patterns=pats, window=8, sink=2,
                       st_start=2, budget_multiple=8, st_block_q=32, st_block_k=32, st_select="always")
    common = dict(pixel_values_videos=vl2["pix"], video_grid_thw=vl2["grid"], max_new_tokens=2,
                  eos_token_id=(), return_cache=True)
    got = G.generate(params, cfg, vl2["ids"], policy=pol, **common)
    assert got.stats["st_layers"] == (2,)
    ids_al, valid = G.realign_left(vl2["ids"], np.ones(vl2["ids"].shape, bool), 192, 0)
    ((off, lay),) = row_layouts(cfg, ids_al, valid, vl2["grid"])
    assert (lay.videos[0].t, lay.videos[0].h, lay.videos[0].w) == (5, 3, 3)
    full = STLayout(192, tuple(VideoSpan(v.start + off, v.t, v.h, v.w) for v in lay.videos))
    masks = np.zeros((3, cfg.text.num_attention_heads, 192, 192), bool)
    for layer, lp in enumerate(pats):
        for h in range(cfg.text.num_attention_heads):
            masks[layer, h] = reference_mask(full, D if lp is None else lp[h])
    masks = jnp.asarray(masks)

    def attend(q, k, v, valid, layer):
        return dense_attention(q, k, v, masks[layer][None] & valid[:, None, None, :])

    ref = G.generate(params, cfg, vl2["ids"], policy=dataclasses.replace(pol, st_sparse=False), attention=attend,
                     **common)
    kept = np.asarray(got.cache.valid)
    np.testing.assert_array_equal(kept, np.asarray(ref.cache.valid))
    for a, b in ((got.cache.k, ref.cache.k), (got.cache.v, ref.cache.v)):
        assert np.abs(np.where(kept[..., None], np.asarray(a) - np.asarray(b), 0)).max() < 1e-5
    np.testing.assert_array_equal(got.tokens, ref.tokens)


def test_fidelity_harness_takes_the_whole_model(vl2):
    """The harness on VideoLLaMA2's state and config: the full cache of its analysis prefill, continued
    teacher-forced, gives the transformers LM's logits on the whole text."""
    cfg, (_, _, lm) = vl2["cfg"], vl2["torch"]
    prompt, cont = vl2["before"][:40], vl2["after"][:6]
    an = analyse_prompt(vl2["params"], cfg, prompt, [PureKVConfig.snapkv(budget=0.5, window=8)])
    cache, _, _, _ = policy_cache(an, cfg, None)
    ours = continuation_logits(vl2["params"].text, cache, jnp.asarray(cont[None], jnp.int32), cfg=cfg.text)
    with torch.no_grad():
        expected = lm(torch.from_numpy(np.r_[prompt, cont][None])).logits[0, -len(cont):].numpy()
    np.testing.assert_allclose(np.asarray(ours[0]), expected, atol=1e-4, rtol=0)


def test_method_modules_hold_no_model_branch():
    """Model-specific code lives under models/: the method's modules never branch on a family or config
    type, and import no model package's internals beyond the shared text stack / config types."""
    root = pathlib.Path(__file__).resolve().parents[1] / "purekv_jax"
    method = ["policies.py", "cache.py", "prefill.py", "decode.py", "generation.py", "config.py",
              "st_sparse/prefill.py"]
    branch = re.compile(r"(==|!=|\bin\b)\s*[\"'](qwen|videollama|mistral|llava)|isinstance\([^)]*(Qwen25VLConfig|"
                        r"VideoLLaMA2Config)|\.name\s*==|family\.name|models\.videollama2", re.I)
    for rel in method:
        text = (root / rel).read_text()
        hits = [line for line in text.splitlines() if branch.search(line)]
        assert not hits, (rel, hits)
        for fn in ("get_rope_index", "embed_inputs", "check_feature_counts", "layer_qkv(", "mrope_cos_sin("):
            assert not re.search(rf"(^|[^.\w]){re.escape(fn)}", text, re.M), (rel, fn)
