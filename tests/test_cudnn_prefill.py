"""The cuDNN prefill path (``purekv_jax.attention``: ``sdpa_prefill_attention``, ``cudnn_prefill_attention``,
``"auto"``) on the CPU: the same ``jax.nn.dot_product_attention`` call with the XLA implementation equals a
float64 numpy causal softmax over each row's real tokens, left-padded rows included; off a GPU "cudnn" and
"auto" fall back to the XLA paths; and the cuDNN call lowers for CUDA (the fused kernel, PADDING_CAUSAL with
per-row lengths, no [N, N] mask) at the 7B model's head shapes."""

from __future__ import annotations

import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from purekv_jax import attention as A


def reference(q, k, v, valid):
    """float64 causal softmax per row over its real tokens (left padding); padding query rows 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, hq, n, d = q.shape
    g = hq // k.shape[1]
    out = np.zeros_like(q)
    for r in range(b):
        real = np.flatnonzero(valid[r])
        for h in range(hq):
            for i in real:
                keys = real[real <= i]
                s = q[r, h, i] @ k[r, h // g, keys].T / np.sqrt(d)
                p = np.exp(s - s.max())
                out[r, h, i] = p @ v[r, h // g, keys] / p.sum()
    return out


def random_inputs(rng, b, hq, hkv, n, d, pads):
    q, k, v = (jnp.asarray(rng.normal(size=(b, h, n, d)), jnp.float32) for h in (hq, hkv, hkv))
    valid = np.ones((b, n), bool)
    for r, pad in enumerate(pads):
        valid[r, :pad] = False
    return q, k, v, valid


@pytest.mark.parametrize("implementation", [None, "xla"])
@pytest.mark.parametrize("n, pads", [(29, (0, 11, 28)), (64, (63, 0, 1))])
def test_sdpa_prefill_matches_reference(implementation, n, pads):
    """Rows without padding, with padding longer than half the row, and with one real token."""
    rng = np.random.default_rng()
    q, k, v, valid = random_inputs(rng, 3, 4, 2, n, 8, pads)
    got = A.sdpa_prefill_attention(q, k, v, jnp.asarray(valid), implementation=implementation)
    assert got.shape == q.shape and got.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(got), reference(q, k, v, valid), atol=2e-6)


def test_off_gpu_cudnn_and_auto_fall_back_to_xla():
    """On the CPU "cudnn" is the XLA path (dense up to AUTO_DENSE_MAX tokens, flash above) and "auto" stays
    dense / flash; both equal the reference, padded rows included."""
    assert jax.default_backend() == "cpu" and not A.cudnn_applies(jnp.zeros((1, 1, 8, 128), jnp.bfloat16))
    assert A.prefill_attention_impl("auto", 64) is A.dense_prefill_attention
    assert A.prefill_attention_impl("auto", A.AUTO_DENSE_MAX + 1) is A.flash_prefill_attention
    assert A.prefill_attention_impl("cudnn", 64) is A.cudnn_prefill_attention
    rng = np.random.default_rng()
    for n in (40, A.AUTO_DENSE_MAX + 24):
        q, k, v, valid = random_inputs(rng, 2, 2, 1, n, 8, (0, 17))
        got = jax.jit(A.cudnn_prefill_attention)(q, k, v, jnp.asarray(valid))
        np.testing.assert_allclose(np.asarray(got), reference(q, k, v, valid), atol=5e-6)


def test_auto_picks_cudnn_on_gpu():
    """With a GPU default backend "auto" is the cuDNN path, and cuDNN applies to bf16 / head_dim 128 only
    (float32 and head_dim 160 take the XLA path)."""
    with mock.patch.object(jax, "default_backend", lambda: "gpu"):
        assert A.prefill_attention_impl("auto", 64) is A.cudnn_prefill_attention
        assert A.cudnn_applies(jnp.zeros((1, 28, 8, 128), jnp.bfloat16))
        assert not A.cudnn_applies(jnp.zeros((1, 28, 8, 128), jnp.float32))
        assert not A.cudnn_applies(jnp.zeros((1, 28, 8, 160), jnp.bfloat16))


def test_cudnn_call_lowers_for_cuda():
    """jax.export for CUDA from the CPU at the 7B head shapes (28 / 4 heads, head_dim 128, bf16, left-padded
    batch): one fused cuDNN attention with the PADDING_CAUSAL mask and two [B] length operands, and no
    boolean [N, N] mask anywhere. cuDNN's version probe needs a GPU, so it is stubbed (the version only
    gates features this call does not use)."""
    fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    b, n = 2, 256
    q = jax.ShapeDtypeStruct((b, 28, n, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, 4, n, 128), jnp.bfloat16)
    valid = jax.ShapeDtypeStruct((b, n), jnp.bool_)
    fn = jax.jit(lambda q, k, v, valid: A.sdpa_prefill_attention(q, k, v, valid, implementation="cudnn"))
    with mock.patch.object(fused, "check_cudnn_version", lambda: 91000):
        exp = jax.export.export(fn, platforms=["cuda"], disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call("__cudnn$fmhaSoftmax")])(q, kv, kv, valid)
    text = exp.mlir_module()
    calls = re.findall(r"custom_call @(\S+)\(", text)
    assert calls == ["__cudnn$fmhaSoftmax"], calls
    assert "PADDING_CAUSAL" in text and f"tensor<{b}xi32>" in text
    assert not re.search(rf"tensor<[0-9x]*{n}x{n}xi1>", text)
