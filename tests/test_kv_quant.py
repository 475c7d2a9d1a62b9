"""Quantised KV cache (KIVI-style 8 / 4 / 2-bit codes) and byte budgets.

The round trip is checked against a float64 reference written here in numpy (its own unpacking and
dequantisation), with the error bound the stored scale gives; the cache's invariants under hypothesis;
decode over a quantised cache against decode over the same cache dequantised; the byte budget's token
count; the unquantised path untouched; and no retrace per call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.qwen2_5_vl import tiny_config
from models.qwen2_5_vl.text import init_text_params
from purekv_jax import cache as C
from kernels.quantized_decode_attention import codes as codes_format
from purekv_jax import kv_quant as Q
from purekv_jax.attention import cache_decode_attention, decode_attention
from purekv_jax.compile_cache import TRACE_COUNTS, clear_compile_cache
from purekv_jax.config import PureKVConfig, PureKVConfigError, kept_bytes
from purekv_jax.decode import SamplingSettings, decode_program
from purekv_jax.fidelity import analyse_prompt, policy_cache
from purekv_jax.generation import generate, prefill_jaxpr
from purekv_jax.presets import PRESETS


def random_kv(rng, shape, outlier_channels=2):
    """Keys / values with a few large channels (the outliers per-channel key quantisation is for)."""
    x = rng.standard_normal(shape) * rng.uniform(0.2, 3.0)
    x[..., rng.choice(shape[-1], outlier_channels, replace=False)] *= 20.0
    return x.astype(np.float32)


def unpack_reference(codes: np.ndarray, bits: int) -> np.ndarray:
    codes = codes.astype(np.int64)
    per = 8 // bits
    out = np.empty(codes.shape[:-1] + (per * codes.shape[-1],), np.int64)
    for j in range(per):
        out[..., j::per] = (codes >> (bits * j)) % 2**bits
    return out


def dequant_reference(codes, scale, zero, bits, per: str) -> np.ndarray:
    """float64 dequantisation: ``per="channel"`` (keys: a scale per group of slots and channel) or
    ``"token"`` (values: a scale per slot and group of channels)."""
    x = unpack_reference(np.asarray(codes), bits).astype(np.float64)
    s, z = np.asarray(scale, np.float64), np.asarray(zero, np.float64)
    axis = -2 if per == "channel" else -1
    g = x.shape[axis] // s.shape[axis]
    return x * np.repeat(s, g, axis=axis) + np.repeat(z, g, axis=axis), np.repeat(s, g, axis=axis)


# ------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("bits", Q.KV_BITS)
@pytest.mark.parametrize("group", [8, 32])
def test_round_trip_within_half_a_scale_of_float64_reference(bits, group):
    rng = np.random.default_rng(bits * 100 + group)
    x = random_kv(rng, (2, 3, 4 * group, 64))
    valid = rng.random(x.shape[:-1]) > 0.25
    kc, ks, kz = Q.quantize_keys(jnp.asarray(x), jnp.asarray(valid), bits, group)
    vc, vs, vz = Q.quantize_values(jnp.asarray(x), bits, group)
    assert kc.dtype == vc.dtype == jnp.uint8 and kc.shape[-1] == 64 * bits // 8
    assert ks.shape == (2, 3, 4, 64) and vs.shape == (2, 3, 4 * group, 64 // group) and ks.dtype == jnp.float16
    for codes, scale, zero, per, deq, mask in (
            (kc, ks, kz, "channel", codes_format.dequantize_keys(kc, ks, kz, bits), valid[..., None]),
            (vc, vs, vz, "token", codes_format.dequantize_values(vc, vs, vz, bits), np.ones_like(valid)[..., None]),
    ):
        ref, s = dequant_reference(codes, scale, zero, bits, per)
        err = np.abs(ref - x.astype(np.float64))
        # the bound from the stored scale: half a step, plus float32 rounding of the input
        bound = s / 2 * (1 + 1e-6) + 1e-6 * np.abs(x)
        assert np.all(np.where(mask, err <= bound, True)), (per, float(np.max(np.where(mask, err - bound, -1))))
        # the jnp dequantisation (float32) is the float64 reference up to float32 rounding
        np.testing.assert_allclose(np.asarray(deq), ref, rtol=1e-6, atol=1e-6 * float(np.abs(ref).max()))


def test_scales_are_stored_rounded_up_and_zeros_down():
    rng = np.random.default_rng(0)
    x = random_kv(rng, (1, 1, 32, 16))
    for bits in Q.KV_BITS:
        _, scale, zero = Q.quantize_values(jnp.asarray(x), bits, 8)
        lo, hi = x.reshape(1, 1, 32, 2, 8).min(-1), x.reshape(1, 1, 32, 2, 8).max(-1)
        z, s = np.asarray(zero, np.float64), np.asarray(scale, np.float64)
        assert np.all(z <= lo) and np.all(z + (2**bits - 1) * s >= hi)


def test_constant_groups_and_empty_key_groups_round_trip_exactly():
    x = np.full((1, 1, 16, 8), 2.5, np.float32)
    kc, ks, kz = Q.quantize_keys(jnp.asarray(x), jnp.ones((1, 1, 16), bool), 4, 8)
    np.testing.assert_array_equal(np.asarray(codes_format.dequantize_keys(kc, ks, kz, 4)), x)
    kc, ks, kz = Q.quantize_keys(jnp.asarray(x), jnp.zeros((1, 1, 16), bool), 8, 8)  # no valid slot: finite
    assert np.isfinite(np.asarray(ks, np.float32)).all()
    assert np.isfinite(np.asarray(codes_format.dequantize_keys(kc, ks, kz, 8))).all()


def test_int4_packing_round_trip_and_nibble_order():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, size=(3, 5, 64)).astype(np.uint8)
    packed = codes_format.pack_codes(jnp.asarray(codes), 4)
    assert packed.shape == (3, 5, 32) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(codes_format.unpack_codes(packed, 4)), codes)
    np.testing.assert_array_equal(np.asarray(packed), codes[..., 0::2] + 16 * codes[..., 1::2])


def test_int2_packing_round_trip_and_order():
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 4, size=(2, 7, 64)).astype(np.uint8)
    packed = codes_format.pack_codes(jnp.asarray(codes), 2)
    assert packed.shape == (2, 7, 16)
    np.testing.assert_array_equal(np.asarray(codes_format.unpack_codes(packed, 2)), codes)
    want = sum(codes[..., j::4].astype(np.int64) << (2 * j) for j in range(4))
    np.testing.assert_array_equal(np.asarray(packed), want)


# ------------------------------------------------------------------------------------------ cache invariants
from_keep_jit = jax.jit(C.from_keep, static_argnames=("capacity", "quant"))
write_layer_jit = jax.jit(C.write_layer)


@st.composite
def keep_sets(draw):
    """A random cache's full K/V and keep-sets in ``keep_set``'s form (kept first, ascending)."""
    layers, batch, heads = 2, 2, 2  # (few shapes: each new one compiles; the keep patterns and data vary)
    group = draw(st.sampled_from([4, 8]))
    n_quant = group * draw(st.sampled_from([1, 3]))
    recent = draw(st.sampled_from([1, 5]))
    slots = n_quant + recent
    n = slots + 7
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    idx = np.zeros((layers, batch, heads, slots), np.int32)
    kept = np.zeros(idx.shape, bool)
    for pos in np.ndindex(idx.shape[:-1]):
        c = int(rng.integers(0, slots + 1))
        chosen = np.sort(rng.choice(n, c, replace=False))
        idx[pos][:c], kept[pos][:c] = chosen, True
    k = random_kv(rng, (layers, batch, heads, n, 8), 1)
    v = random_kv(rng, (layers, batch, heads, n, 8), 1)
    return k, v, idx, kept, Q.QuantLayout(draw(st.sampled_from(Q.KV_BITS)), group, n_quant)


@settings(max_examples=25, deadline=None)
@given(keep_sets())
def test_quantised_cache_invariants(case):
    k, v, idx, kept, layout = case
    n_layers, b, h, slots = idx.shape
    extra = 3
    cache = from_keep_jit(jnp.asarray(k), jnp.asarray(v), jnp.asarray(idx), jnp.asarray(kept), slots + extra,
                          np.full(b, k.shape[3]), quant=layout)
    recent = slots - layout.slots
    assert cache.quantized_slots == layout.slots and cache.capacity == recent + extra
    np.testing.assert_array_equal(np.asarray(cache.length), recent)
    q_valid, r_valid = np.asarray(cache.quant.valid), np.asarray(cache.valid)
    mat = C.materialized(cache)
    for pos in np.ndindex(idx.shape[:-1]):
        held = idx[pos][kept[pos]]
        c = len(held)
        # every kept entry is held exactly once: the last min(c, recent) in the model's dtype, bit for bit
        assert q_valid[pos].sum() + r_valid[pos].sum() == c
        n_rec = min(c, recent)
        np.testing.assert_array_equal(r_valid[pos], np.arange(recent + extra) < n_rec)
        np.testing.assert_array_equal(np.asarray(cache.k)[pos][:n_rec], k[pos][held[c - n_rec:]])
        np.testing.assert_array_equal(np.asarray(cache.v)[pos][:n_rec], v[pos][held[c - n_rec:]])
        # ... the others quantised, in order, each within half a scale step
        old = held[: c - n_rec]
        np.testing.assert_array_equal(q_valid[pos], np.arange(layout.slots) < len(old))
        # each slot's token index follows its entry: the quantised ones first, then the recent ones, -1 if empty
        want_index = np.full(layout.slots + recent + extra, -1)
        want_index[: len(old)] = old
        want_index[layout.slots: layout.slots + n_rec] = held[c - n_rec:]
        np.testing.assert_array_equal(np.asarray(cache.token_index)[pos], want_index)
        got_k, got_v = np.asarray(mat.k)[pos][: len(old)], np.asarray(mat.v)[pos][: len(old)]
        ks = np.repeat(np.asarray(cache.quant.k_scale[pos], np.float64), layout.group, axis=0)[: len(old)]
        vs = np.repeat(np.asarray(cache.quant.v_scale[pos], np.float64), layout.group, axis=1)[: len(old)]
        assert np.all(np.abs(got_k - k[pos][old]) <= ks / 2 * (1 + 1e-5) + 1e-5 * np.abs(k[pos][old]))
        assert np.all(np.abs(got_v - v[pos][old]) <= vs / 2 * (1 + 1e-5) + 1e-5 * np.abs(v[pos][old]))
    # layer-by-layer writes (the prefill's path) build the same cache
    kk, vv = jax.vmap(C.keep_indices)(jnp.asarray(k), jnp.asarray(v), jnp.asarray(idx))
    written = C.create(n_layers, b, h, slots + extra, 8, jnp.float32, layout)
    for layer in range(n_layers):
        written = write_layer_jit(written, layer, kk[layer], vv[layer], jnp.asarray(kept[layer]),
                                  jnp.asarray(idx[layer], jnp.int32))
    for a, w in zip(jax.tree.leaves(dataclasses.replace(cache, length=written.length,
                                                        next_position=written.next_position)),
                    jax.tree.leaves(written)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(w))
    # the bytes held: float32 slots; codes and value scales / zeros per valid slot; key scales / zeros per
    # group holding a valid slot (float16 each)
    groups = q_valid.reshape(*q_valid.shape[:-1], -1, layout.group).any(-1).sum()
    per_quant_slot = 2 * 8 * layout.bits // 8 + 2 * 2 * (8 // layout.group)
    want = r_valid.sum() * 2 * 8 * 4 + q_valid.sum() * per_quant_slot + groups * 2 * 8 * 2
    assert C.kv_bytes_kept(cache) == want and C.kv_tokens_kept(cache) == kept.sum()


# ------------------------------------------------------------------------------------------ decode
@pytest.fixture(scope="module")
def tiny():
    config = tiny_config(num_hidden_layers=3)
    params = init_text_params(config.text, jax.random.key(11), std=0.15)  # peaky attention: no near-ties
    return config, params


def random_quantised_cache(config, bits, seed=0, n=96, slots=72, extra=16, group=8):
    cfg = config.text
    rng = np.random.default_rng(seed)
    shape = (cfg.num_hidden_layers, 2, cfg.num_key_value_heads, n, cfg.head_dim)
    k, v = random_kv(rng, shape, 1), random_kv(rng, shape, 1)
    idx = np.sort(np.stack([rng.choice(n, slots, replace=False) for _ in range(int(np.prod(shape[:3])))]), -1)
    kept = rng.random(idx.shape) > 0.1
    idx = idx.reshape(shape[:3] + (slots,)).astype(np.int32)
    kept = np.sort(kept.reshape(idx.shape), -1)[..., ::-1]  # kept first, as keep_set returns them
    layout = Q.QuantLayout(bits, group, (slots - 16) // group * group)
    return C.from_keep(jnp.asarray(k), jnp.asarray(v), jnp.asarray(idx), jnp.asarray(kept.copy()), slots + extra,
                       next_position=np.full(2, n), quant=layout)


@pytest.mark.parametrize("bits", Q.KV_BITS)
def test_decode_attention_over_codes_equals_attention_over_the_dequantised_cache(tiny, bits):
    config, _ = tiny
    cache = random_quantised_cache(config, bits)
    mat = C.materialized(cache)
    q = jnp.asarray(np.random.default_rng(1).standard_normal((2, config.text.num_attention_heads, 1,
                                                              config.text.head_dim)), jnp.float32)
    for layer in range(config.text.num_hidden_layers):
        got = jax.jit(cache_decode_attention)(q, cache, layer)
        want = decode_attention(q, mat.k[layer], mat.v[layer], mat.valid[layer])
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", Q.KV_BITS)
def test_decode_with_quantised_cache_equals_decode_with_materialised_cache(tiny, bits):
    config, params = tiny
    cache = random_quantised_cache(config, bits, seed=bits)
    mat = jax.tree.map(jnp.copy, C.materialized(cache))  # (its own arrays: decode donates the cache)
    logits = jnp.asarray(np.random.default_rng(2).standard_normal((2, config.text.vocab_size)), jnp.float32)
    sampling = SamplingSettings(n_tokens=16)
    prog, args = decode_program(params, cache, logits, 12, 0, cfg=config.text, sampling=sampling)
    got = prog.run(*args)  # (donates the quantised cache)
    prog_m, args_m = decode_program(params, mat, logits, 12, 0, cfg=config.text, sampling=sampling)
    want = prog_m.run(*args_m)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    n_quant = got.cache.quantized_slots
    # Two float32 attentions summing in different orders (the codes' partial softmax, the dense decode
    # attention), each within 1e-6 of a float64 softmax per call; their difference compounds over 12 tokens
    # and 3 layers into the keys written last.
    np.testing.assert_allclose(np.asarray(got.cache.k), np.asarray(want.cache.k)[..., n_quant:, :], rtol=1e-5,
                               atol=3e-5)
    np.testing.assert_array_equal(np.asarray(got.cache.valid), np.asarray(want.cache.valid)[..., n_quant:])
    np.testing.assert_array_equal(np.asarray(got.cache.length) + n_quant, np.asarray(want.cache.length))


# ------------------------------------------------------------------------------------------ byte budgets
def text_config(head_dim=64, layers=4):
    cfg = tiny_config(num_hidden_layers=layers).text
    return dataclasses.replace(cfg, head_dim_override=head_dim, mrope_section=(head_dim // 8, head_dim // 16 * 3,
                                                                               head_dim // 16 * 3))


def test_byte_budget_worked_example():
    """bf16, head_dim 64, 1,024 tokens, 20% of the bytes, window 32, groups of 32: a full token costs 256
    bytes, a 4-bit one 80 (64 of codes, 8 of value scales, 8 of its key group's scales), an 8-bit one 144;
    the 32 most recent stay bf16. int4: 32 * 256 + 544 * 80 = 51,712 <= 52,428.8 -> 576 tokens (544
    quantised); int8: 32 * 256 + 288 * 144 = 49,664 -> 320 (288 quantised); bf16: 192."""
    cfg = text_config()
    want = {None: (192, None), 8: (320, 288), 4: (576, 544)}
    for bits, (count, n_quant) in want.items():
        pk = PureKVConfig(budget=0.2, budget_unit="bytes", kv_bits=bits, kv_group=32)
        plan = pk.resolve(cfg, 1024, kv_dtype=jnp.bfloat16)
        assert plan.slots == count and plan.budgets == (count,) * 4, bits
        assert (plan.quant is None and n_quant is None) or (plan.quant.slots == n_quant and plan.kv_bits == bits)
        assert plan.recent_slots == count - (n_quant or 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("bits", [None, *Q.KV_BITS])
def test_byte_budget_keeps_as_many_tokens_as_fit(dtype, bits):
    cfg = text_config()
    full_token = 2 * 64 * jnp.dtype(dtype).itemsize
    for n in (500, 1000, 2048):
        for frac in (0.1, 0.2, 0.4):
            pk = PureKVConfig(budget=frac, budget_unit="bytes", kv_bits=bits)
            plan = pk.resolve(cfg, n, kv_dtype=dtype)
            count = plan.budgets[0]
            cost = lambda s: kept_bytes(s, full_token, bits, 64, pk.window, pk.kv_group)
            assert cost(count) <= frac * n * full_token, (n, frac)
            assert count == n or cost(count + pk.budget_multiple) > frac * n * full_token, (n, frac)
            assert count % pk.budget_multiple == 0 or count == n


def test_generate_counts_the_bytes_it_keeps(tiny):
    config, params = tiny
    ids = np.random.default_rng(4).integers(0, 900, size=(1, 400))
    full = generate(params, config, ids, max_new_tokens=2).stats
    for bits in (None, 8, 4):
        pk = PureKVConfig(budget=0.25, budget_unit="bytes", kv_bits=bits, kv_group=8)
        out = generate(params, config, ids, policy=pk, max_new_tokens=2, return_cache=True)
        st_, plan = out.stats, pk.resolve(config.text, 400)
        assert st_["kv_bits"] == bits and st_["kv_bytes_full"] == full["kv_bytes_full"]
        assert st_["kv_bytes_kept"] <= 0.25 * st_["kv_bytes_full"]
        assert st_["kv_tokens_kept"] == plan.slots * config.text.num_hidden_layers * config.text.num_key_value_heads
        assert st_["kv_bytes_kept"] == pytest.approx(config.text.num_hidden_layers * config.text.num_key_value_heads
                                                     * kept_bytes(plan.slots, 2 * config.text.head_dim * 4, bits,
                                                                  config.text.head_dim, pk.window, pk.kv_group))
    assert pk.resolve(config.text, 400).slots > 3 * PureKVConfig(budget=0.25, budget_unit="bytes", kv_group=8).resolve(
        config.text, 400).slots  # 4-bit codes hold several times the tokens


def test_auto_width_is_8_bits_when_they_hold_the_whole_prompt_else_4():
    """Groups of 64: an 8-bit token costs 128 + 4 + 4 = 136 bytes against bf16's 256, so 8-bit codes hold a
    whole 1,024-token prompt (960 slots quantised, whole groups; the 64 most recent in bf16) from
    64 * 256 + 960 * 136 = 146,944 bytes on, 56.05% of the full cache's."""
    cfg = text_config()
    for frac, bits in ((0.1, 4), (0.2, 4), (0.4, 4), (0.56, 4), (0.561, 8), (0.8, 8)):
        plan = PureKVConfig(budget=frac, budget_unit="bytes", kv_bits="auto").resolve(cfg, 1024, kv_dtype=jnp.bfloat16)
        assert plan.kv_bits == bits, frac
        assert bits == 4 or plan.slots == 1024


def test_config_errors():
    with pytest.raises(PureKVConfigError, match="kv_bits"):
        PureKVConfig(kv_bits=3)
    with pytest.raises(PureKVConfigError, match="budget_unit='bytes'"):
        PureKVConfig(kv_bits="auto")
    with pytest.raises(PureKVConfigError, match="budget_unit"):
        PureKVConfig(budget_unit="pages")
    with pytest.raises(PureKVConfigError, match="kv_group"):
        PureKVConfig(kv_bits=4, kv_group=3)
    with pytest.raises(PureKVConfigError, match="does not divide"):
        PureKVConfig(kv_bits=4, kv_group=32).resolve(text_config(head_dim=16), 500)
    with pytest.raises(PureKVConfigError, match="window"):
        PureKVConfig(budget=0.01, budget_unit="bytes", kv_bits=8).resolve(text_config(), 1000)
    auto = PureKVConfig(budget=0.2, budget_unit="bytes", kv_bits="auto").resolve(text_config(), 1000)
    assert auto.kv_bits in Q.KV_BITS


# ------------------------------------------------------------------------------------------ unchanged, no retrace
def test_kv_bits_none_leaves_the_programs_without_quantisation(tiny):
    config, params = tiny
    ids = np.random.default_rng(5).integers(0, 900, size=(1, 200))
    for pk in (None, PureKVConfig(budget=0.3), PureKVConfig(budget=0.3, budget_unit="bytes")):
        plan, jaxpr = prefill_jaxpr(params, config, ids, pk)
        assert plan.quant is None and "u8" not in str(jaxpr) and "f16" not in str(jaxpr)
        out = generate(params, config, ids, policy=pk, max_new_tokens=3, return_cache=True)
        assert out.cache.quant is None  # no quantised leaf: every field but quant is one array
        assert len(jax.tree.leaves(out.cache)) == len(dataclasses.fields(C.KVCache)) - 1
    plan, jaxpr = prefill_jaxpr(params, config, ids, PureKVConfig(budget=0.3, kv_bits=4, kv_group=8))
    assert plan.quant is not None and "u8" in str(jaxpr)


def test_quantised_generate_compiles_once(tiny):
    config, params = tiny
    rng = np.random.default_rng(6)
    pk = PureKVConfig(budget=0.2, budget_unit="bytes", kv_bits=4, kv_group=8)
    clear_compile_cache()
    first = generate(params, config, rng.integers(0, 900, size=(2, 300)), policy=pk, max_new_tokens=5)
    for _ in range(2):
        out = generate(params, config, rng.integers(0, 900, size=(2, 300)), policy=pk, max_new_tokens=5)
        assert out.stats["prefill_compile_s"] == 0.0 and out.stats["decode_compile_s"] == 0.0
    assert TRACE_COUNTS["prefill"] == 1 and TRACE_COUNTS["decode"] == 1
    assert first.stats["kv_bits"] == 4


# ------------------------------------------------------------------------------------------ the harness's caches
def test_harness_quantised_caches_are_generates(tiny):
    """The fidelity harness's caches (analysis prefill, ``build_cache``) quantise as ``generate``'s prefill
    does: the same valid slots, the same model-dtype entries, codes equal but where a key or value sits on a
    rounding boundary (the two prefills' float32 keys differ in the last bits), every byte preset."""
    config, params = tiny
    n_layers = config.text.num_hidden_layers
    ids = np.random.default_rng(7).integers(0, 990, size=160).astype(np.int32)
    pks = [p.make(0.3, n_layers, kv_group=8) for p in PRESETS.values() if p.group == "bytes"]
    pks += [PureKVConfig(budget=0.3, base="pyramid", pyramid_beta=4.0, kv_bits=4, kv_group=8),
            PureKVConfig(budget=0.3, adaptive_heads=True, kv_bits=8, kv_group=8)]
    an = analyse_prompt(params, config.text, ids, pks)
    for pk in pks:
        cache, _, _, plan = policy_cache(an, config.text, pk)
        ref = generate(params, config, ids[None], policy=pk, max_new_tokens=1, eos_token_id=-1,
                       return_cache=True, prompt_bucket=32).cache
        assert (plan.quant is None) == (ref.quant is None) == (pk.kv_bits is None), pk
        r = plan.recent_slots
        np.testing.assert_array_equal(np.asarray(ref.valid)[..., :r], np.asarray(cache.valid)[..., :r], err_msg=str(pk))
        np.testing.assert_allclose(np.asarray(ref.k)[..., :r, :], np.asarray(cache.k)[..., :r, :], atol=1e-5)
        if plan.quant is None:
            continue
        np.testing.assert_array_equal(np.asarray(ref.quant.valid), np.asarray(cache.quant.valid), err_msg=str(pk))
        for name in ("k_codes", "v_codes"):
            a, b = np.asarray(getattr(ref.quant, name)), np.asarray(getattr(cache.quant, name))
            assert np.mean(a != b) < 0.01, (pk, name)
        m_ref, m_harness = C.materialized(ref), C.materialized(cache)
        tol = 1.01 * float(np.asarray(cache.quant.k_scale, np.float32).max()) + 1e-5  # at most one code step
        np.testing.assert_allclose(np.asarray(m_ref.k)[..., : plan.slots, :], np.asarray(m_harness.k), atol=tol)


def test_pallas_decode_path_gives_the_xla_paths_tokens(tiny):
    """``kv_decode="pallas"`` (the kernel, interpret mode on the CPU) decodes the tokens the XLA path decodes,
    and the config refuses an unknown path."""
    config, params = tiny
    ids = np.random.default_rng(6).integers(0, 900, size=(2, 300))
    runs = {path: generate(params, config, ids, max_new_tokens=6, policy=PureKVConfig(
        budget=0.3, budget_unit="bytes", kv_bits=4, kv_group=8, kv_decode=path)) for path in ("xla", "pallas")}
    np.testing.assert_array_equal(runs["pallas"].tokens, runs["xla"].tokens)
    with pytest.raises(PureKVConfigError, match="kv_decode"):
        PureKVConfig(kv_bits=4, kv_decode="cuda")


def test_adaptive_heads_stay_within_the_byte_budget(tiny):
    """AdaKV's per-head counts under a byte budget: however the entries spread over the heads, the cache's
    bytes (counted from its arrays) stay within the budget: the model-dtype slots are the per-head budget's,
    and a part-filled key group's scales are paid for."""
    config, params = tiny
    rng = np.random.default_rng(9)
    for n in (300, 420):
        ids = rng.integers(0, 900, size=(2, n))
        pk = PureKVConfig(budget=0.25, budget_unit="bytes", kv_bits=4, kv_group=8, adaptive_heads=True)
        st_ = generate(params, config, ids, policy=pk, max_new_tokens=2).stats
        assert st_["kv_bytes_kept"] <= 0.25 * st_["kv_bytes_full"]
        plan = pk.resolve(config.text, n)
        uniform = PureKVConfig(budget=0.25, budget_unit="bytes", kv_bits=4, kv_group=8).resolve(config.text, n)
        assert plan.recent_slots == uniform.recent_slots and plan.slots > uniform.slots
