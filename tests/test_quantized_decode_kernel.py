"""Decode attention over quantised KV slots: the Pallas kernel (interpret mode) and the XLA path against the
dense float32 twin, the partial-softmax merge against one softmax, and the kernel's lowering for GPU
(Triton) and TPU (Mosaic) from the CPU."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.quantized_decode_attention import (QuantizedSlots, dense_partials, merge_partials, normalize,
                                                pack_codes, pallas_partials, phase_merge, phase_split,
                                                quantized_decode_attention, quantized_partials)
from purekv_jax import kv_quant as Q

JAX_011 = tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11)


def _slots(key, b, hkv, n, d, bits, group, p_valid=0.7):
    kk, kv, km = jax.random.split(key, 3)
    k = jax.random.normal(kk, (b, hkv, n, d)) * 2.0 + 0.5
    v = jax.random.normal(kv, (b, hkv, n, d))
    valid = jax.random.bernoulli(km, p_valid, (b, hkv, n))
    kc, ks, kz = Q.quantize_keys(k, valid, bits, group)
    vc, vs, vz = Q.quantize_values(v, bits, group)
    return QuantizedSlots(kc, ks, kz, vc, vs, vz, valid, bits)


@settings(max_examples=12, deadline=None)
@given(bits=st.sampled_from((8, 4, 2)), d_group=st.sampled_from(((64, 64), (128, 64), (64, 32), (32, 16))),
       g=st.sampled_from((1, 3, 4, 7)), n_groups=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_kernel_and_xla_match_dense_reference(bits, d_group, g, n_groups, seed):
    d, group = d_group
    key = jax.random.PRNGKey(seed)
    slots = _slots(key, 2, 2, n_groups * group, d, bits, group)
    q = jax.random.normal(jax.random.fold_in(key, 7), (2, 2, g, d))
    ref = normalize(quantized_partials(q, slots, backend="reference"))
    for backend in ("xla", "pallas"):
        out = normalize(quantized_partials(q, slots, backend=backend, interpret=True))
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5, err_msg=backend)


def test_rows_without_valid_slots_give_zero_and_merge_away():
    """A (row, head) with no valid quantised slot: m = -inf, l = 0, and merged with model-dtype slots the
    result is attention over those alone."""
    key = jax.random.PRNGKey(3)
    slots = _slots(key, 1, 2, 64, 64, 4, 64)
    slots = QuantizedSlots(*[getattr(slots, f) for f in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale",
                                                         "v_zero")], slots.valid.at[0, 1].set(False), slots.bits)
    q = jax.random.normal(jax.random.fold_in(key, 1), (1, 2, 3, 64))
    acc, m, l = quantized_partials(q, slots, backend="pallas", interpret=True)
    assert np.all(np.isneginf(np.asarray(m[0, 1]))) and np.all(np.asarray(l[0, 1]) == 0)
    k = jax.random.normal(jax.random.fold_in(key, 2), (1, 2, 5, 64))
    v = jax.random.normal(jax.random.fold_in(key, 3), (1, 2, 5, 64))
    valid = jnp.ones((1, 2, 5), bool)
    out = quantized_decode_attention(q, slots, k, v, valid, backend="pallas", interpret=True)
    s = jnp.einsum("gd,cd->gc", q[0, 1], k[0, 1], precision="highest") * 64**-0.5
    np.testing.assert_allclose(np.asarray(out[0, 1]), np.asarray(jax.nn.softmax(s) @ v[0, 1]), atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 40), cut=st.integers(1, 39), seed=st.integers(0, 2**16))
def test_merged_partials_equal_one_softmax(n, cut, seed):
    """Partials over two disjoint slot sets merge into the softmax over their union (float64 numpy twin)."""
    cut = min(cut, n - 1)
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((1, 1, 2, 8)), rng.standard_normal((1, 1, n, 8)), rng.standard_normal((1, 1, n, 8))
    valid = rng.random((1, 1, n)) < 0.8
    valid[0, 0, 0] = True
    f = lambda a: jnp.asarray(a, jnp.float32)
    parts = [dense_partials(f(q), f(k[:, :, sl]), f(v[:, :, sl]), jnp.asarray(valid[:, :, sl]), 0.5)
             for sl in (slice(0, cut), slice(cut, n))]
    out = np.asarray(normalize(merge_partials(parts)))
    s = np.einsum("gd,cd->gc", q[0, 0], k[0, 0]) * 0.5
    s = np.where(valid[0, 0], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(out[0, 0], (p / p.sum(-1, keepdims=True)) @ v[0, 0], rtol=1e-5, atol=1e-5)


def test_phase_split_is_the_packed_layout():
    """Phase j of a packed byte row holds channels j::p: shifting the packed codes by j * bits and masking
    gives exactly phase_split of the unpacked codes."""
    rng = np.random.default_rng(0)
    for bits in (8, 4, 2):
        codes = jnp.asarray(rng.integers(0, 2**bits, (3, 64)), jnp.uint8)
        packed = pack_codes(codes, bits)
        split = phase_split(codes, bits)
        for j in range(8 // bits):
            np.testing.assert_array_equal(np.asarray((packed >> (j * bits)) & (2**bits - 1)), np.asarray(split[:, j]))
        np.testing.assert_array_equal(np.asarray(phase_merge(split)), np.asarray(codes))


def _abstract(b=1, hkv=4, g=7, d=128, group=64, n=256, bits=4):
    w = d * bits // 8
    sd = jax.ShapeDtypeStruct
    f16 = jnp.float16
    slots = QuantizedSlots(sd((b, hkv, n, w), jnp.uint8), sd((b, hkv, n // group, d), f16),
                           sd((b, hkv, n // group, d), f16), sd((b, hkv, n, w), jnp.uint8),
                           sd((b, hkv, n, d // group), f16), sd((b, hkv, n, d // group), f16),
                           sd((b, hkv, n), jnp.bool_), bits)
    return sd((b, hkv, g, d), jnp.bfloat16), slots


@pytest.mark.parametrize("bits", (8, 4, 2))
def test_kernel_lowers_for_tpu(bits):
    """jax.export from the CPU to a Mosaic TPU custom call (no disabled check); Mosaic's own compiler runs
    only on a TPU."""
    q, slots = _abstract(bits=bits)
    tpu = jax.export.export(jax.jit(functools.partial(pallas_partials, scale=0.1)), platforms=["tpu"])(q, slots)
    assert "tpu_custom_call" in tpu.mlir_module()


def _abstract_gpu():
    """jax >= 0.11 lowers Triton kernels only for a (possibly abstract) GPU device."""
    if not JAX_011:
        return contextlib.nullcontext()
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType  # (jax >= 0.11 names)
    dev = AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="gpu")
    return jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=dev))


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
def test_kernel_lowers_for_gpu_triton():
    """jax.export from the CPU for CUDA: the Triton custom call (no compatibility guarantee, hence the
    disabled check); PTX is produced only on the device."""
    q, slots = _abstract(bits=4)
    with _abstract_gpu():
        gpu = jax.export.export(jax.jit(functools.partial(pallas_partials, scale=0.1, target="triton")),
                                platforms=["cuda"],
                                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
                                )(q, slots)
    assert "triton" in gpu.mlir_module()
