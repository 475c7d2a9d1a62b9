"""jax.export of the block-sparse kernels for CUDA and TPU from a CPU-only machine.

What lowers without the device (jax 0.10.2 and 0.11.2):
- Pallas Triton kernel -> platforms=['cuda']: lowers (the Triton IR is embedded in a
  `__gpu$xla.gpu.triton` custom call). Serialising needs
  DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton') because that custom call has no
  compatibility guarantee; without it export raises (checked below). PTX/cubin are only produced by
  the CUDA runtime on the device.
- Pallas TPU kernel -> platforms=['tpu']: lowers to a Mosaic `tpu_custom_call` without any disabled
  check, also with return_lse=True (the split union heads). Mosaic's own layout passes and the TPU
  compile run only on a TPU, so VMEM/layout problems would only show there.
- XLA block fallback and the segment path: export for both.
- Mosaic GPU kernel -> platforms=['cuda']: lowers to a `mosaic_gpu_v2` custom call with no disabled
  safety check and no (abstract) GPU device, on jax 0.10.2 and 0.11.2, also with return_lse=True
  (the split union heads). The Pallas -> Mosaic GPU
  lowering runs here (register layouts, WGMMA / TMA shape and swizzle rules, the SMEM budget: e.g.
  mismatched WGMMA swizzles and a 320 KB SMEM request were caught this way); PTX / SASS, register
  allocation and asynchronous hazards only show on the device.
- jax >= 0.11: the Triton lowering asks for the GPU's compute capability; from a CPU-only machine it
  raises "No supported GPU devices found" unless an abstract GPU device is set with
  jax.sharding.use_abstract_mesh(AbstractMesh(..., abstract_device=AbstractDevice('NVIDIA H200',
  None, 'gpu'))) - done below (and the failure without it is checked).
- jax >= 0.11: lowering the Triton kernel emits the 'jax-pallas-triton' DeprecationWarning ("will be
  removed in a future JAX version"); it still lowers and runs (checked below). If that deprecation is
  accelerated to an error, backend='xla' (or a Mosaic GPU port) is the way out.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import pytest

from kernels.block_sparse_attention import STLayout, block_sparse_attention

LAYOUT = STLayout(1000, ((40, 4, 12, 16),))
PATS = ("union", "temporal", "spatial", "dense")
TRITON_CC = "__gpu$xla.gpu.triton"
MOSAIC_GPU_CC = "mosaic_gpu_v2"
JAX_011 = tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11)
ignore_triton_deprecation = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")


def _abstract_gpu():
    """jax >= 0.11 needs a (abstract) GPU to lower Triton kernels; 0.10 does not."""
    if not JAX_011:
        return contextlib.nullcontext()
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType
    dev = AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="gpu")
    return jax.sharding.use_abstract_mesh(
        AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=dev))


def _export(backend, platform, dtype=jnp.bfloat16, d=128, bq=None, bk=None, abstract_gpu=True,
            split_union=True, **kw):
    f = functools.partial(block_sparse_attention, layout=LAYOUT, head_patterns=PATS, backend=backend,
                          block_q=bq, block_k=bk, interpret=False, split_union=split_union)
    q = jax.ShapeDtypeStruct((1, 4, LAYOUT.seq_len, d), dtype)
    k = jax.ShapeDtypeStruct((1, 2, LAYOUT.seq_len, d), dtype)
    ctx = _abstract_gpu() if (abstract_gpu and platform == "cuda") else contextlib.nullcontext()
    with ctx:
        return jax.export.export(jax.jit(f), platforms=[platform], **kw)(q, k, k)


@ignore_triton_deprecation
@pytest.mark.parametrize("dtype,d,blocks", [(jnp.bfloat16, 128, (64, 64)),
                                            (jnp.float32, 64, (128, 32))])
def test_triton_exports_for_cuda(dtype, d, blocks):
    exp = _export("triton", "cuda", dtype, d, *blocks,
                  disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CC)])
    text = exp.mlir_module()
    assert TRITON_CC in text and exp.platforms == ("cuda",)
    assert len(exp.mlir_module_serialized) > 0


@ignore_triton_deprecation
def test_triton_export_needs_disabled_custom_call_check():
    with pytest.raises(ValueError, match="custom calls whose targets have no compatibility"):
        _export("triton", "cuda")


@pytest.mark.skipif(not JAX_011, reason="the Pallas Triton deprecation starts with jax 0.11")
def test_triton_lowering_warns_deprecation_on_jax_011():
    with pytest.warns(DeprecationWarning, match="Pallas Triton backend is deprecated"):
        _export("triton", "cuda", disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CC)])


@ignore_triton_deprecation
@pytest.mark.skipif(not JAX_011, reason="jax 0.10 lowers Triton kernels without a GPU")
def test_triton_export_without_gpu_needs_abstract_device_on_jax_011():
    with pytest.raises(RuntimeError, match="No supported GPU devices found"):
        _export("triton", "cuda", abstract_gpu=False,
                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CC)])


@pytest.mark.parametrize("dtype,d", [(jnp.bfloat16, 128), (jnp.float32, 64)])
def test_tpu_exports_for_tpu(dtype, d):
    """The union head runs split (SPATIAL + TEMPORAL_STRICT merged by log-sum-exp): the kernel
    with return_lse=True (lane-dense [B, H, Np, 128] float32 LSE output) lowers too."""
    exp = _export("tpu", "tpu", dtype, d, 128, 128)
    text = exp.mlir_module()
    assert "tpu_custom_call" in text and exp.platforms == ("tpu",)
    assert "st_block_sparse_fwd_tpu_lse" in text
    one_pass = _export("tpu", "tpu", dtype, d, 128, 128, split_union=False).mlir_module()
    assert "st_block_sparse_fwd_tpu_lse" not in one_pass


@pytest.mark.parametrize("backend", ["xla", "segments"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_xla_paths_export(backend, platform):
    exp = _export(backend, platform)
    assert exp.platforms == (platform,)


@pytest.mark.parametrize("dtype,d,blocks", [(jnp.bfloat16, 128, (64, 128)),
                                            (jnp.float16, 64, (128, 64))])
@pytest.mark.parametrize("split_union", [True, False])
def test_mosaic_gpu_exports_for_cuda_without_gpu(dtype, d, blocks, split_union):
    """split_union: the union head runs as two passes of the kernel with return_lse=True (the [bq]
    float32 SMEM tile and its 1-D TMA to the [B, H, Np] log-sum-exp output lower too)."""
    exp = _export("mosaic_gpu", "cuda", dtype, d, *blocks, abstract_gpu=False,
                  split_union=split_union)
    assert MOSAIC_GPU_CC in exp.mlir_module() and exp.platforms == ("cuda",)
    assert len(exp.mlir_module_serialized) > 0
