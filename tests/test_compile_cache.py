"""compile_cache: the backend's compile options reach XLA, an option XLA refuses is dropped, and a program is
compiled once per shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from purekv_jax import compile_cache as CC


def scaled_sum(x, y, *, scale):
    """``scale * (x @ y).sum(-1)``: a small program with a dot and a fusion."""
    return scale * jnp.tanh(x @ y).sum(-1)


@pytest.fixture
def fresh_cache(monkeypatch):
    monkeypatch.setattr(CC, "UNKNOWN_OPTIONS", set())
    CC.clear_compile_cache()
    yield
    CC.clear_compile_cache()


def test_options_reach_xla_and_a_refused_one_is_dropped(fresh_cache, monkeypatch):
    rng = np.random.default_rng(0)
    x, y = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((5, 7), (7, 3)))
    platform = CC.platform_of(jax.tree.leaves((x, y)))
    bogus = "xla_no_such_option_for_this_test"
    known = dict(CC.COMPILER_OPTIONS.get(platform, {}))
    monkeypatch.setitem(CC.COMPILER_OPTIONS, platform, {bogus: True, **known})
    program = CC.compiled("scaled_sum", scaled_sum, dict(scale=2.0), (x, y))
    assert CC.UNKNOWN_OPTIONS == {bogus}  # XLA saw it (and refused it); the known ones were accepted
    want = 2.0 * np.tanh(np.asarray(x, np.float64) @ np.asarray(y, np.float64)).sum(-1)
    np.testing.assert_allclose(np.asarray(program.run(x, y)), want, rtol=1e-5, atol=1e-5)
    # a later compile leaves the refused option out instead of failing again
    again = CC.compiled("scaled_sum", scaled_sum, dict(scale=3.0), (x, y))
    np.testing.assert_allclose(np.asarray(again.run(x, y)), 1.5 * want, rtol=1e-5, atol=1e-5)


def test_an_error_that_is_not_a_refused_option_is_raised(fresh_cache, monkeypatch):
    x = jnp.ones((2, 2), jnp.float32)
    platform = CC.platform_of([x])
    monkeypatch.setitem(CC.COMPILER_OPTIONS, platform, {"xla_dump_to": 3})  # known option, wrong type
    with pytest.raises(jax.errors.JaxRuntimeError):
        CC.compiled("scaled_sum", scaled_sum, dict(scale=1.0), (x, x))
    assert not CC.UNKNOWN_OPTIONS


def test_one_compile_per_shape(fresh_cache):
    rng = np.random.default_rng(1)
    x, y = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((4, 6), (6, 2)))
    first = CC.compiled("scaled_sum", scaled_sum, dict(scale=1.0), (x, y))
    second = CC.compiled("scaled_sum", scaled_sum, dict(scale=1.0), (x + 1, y))
    assert second.run is first.run and second.compile_s == 0.0
    other = CC.compiled("scaled_sum", scaled_sum, dict(scale=1.0), (x[:3], y))
    assert other.run is not first.run and len(CC.compiled_programs()["scaled_sum"]) == 2
