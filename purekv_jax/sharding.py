"""Device meshes and sharding rules: parameters and the KV cache over a ``("data", "model")`` mesh.

JAX's own SPMD is the distributed engine: parameters are placed with :class:`~jax.sharding.NamedSharding`
(orbax restores straight into them, see :func:`purekv_jax.checkpoint.load_checkpoint`), ``generate`` puts its
batch inputs over ``"data"`` (:func:`shard_batch`) and jit propagates the rest. Sharding never changes what
is computed, only where; every policy and ST-SpAttn runs unchanged.

Mesh: ``make_mesh("data=4,model=2")`` (one axis may be ``-1``: the remaining devices). Axes are
``AxisType.Auto`` (GSPMD / Shardy propagation; no sharding in types).

Parameter rule (Megatron-style tensor parallelism over ``"model"``; replicated over ``"data"``). ``m`` is the
size of the model axis. A dimension made of heads is sharded only when its *head count* is a multiple of
``m`` (so every shard holds whole heads); otherwise that leaf is replicated over ``"model"``:

==========================================  ===========================================  ================
leaf (text)                                 sharded dimension                            condition
==========================================  ===========================================  ================
``layers.q_w [L,D,Hq*hd]``, ``q_b``         output (query heads)                         ``Hq % m == 0``
``layers.o_w [L,Hq*hd,D]``                  input (query heads)                          ``Hq % m == 0``
``layers.k_w/v_w [L,D,Hkv*hd]``, biases     output (KV heads)                            ``Hkv % m == 0``
``layers.gate_w/up_w [L,D,F]``              output (MLP width)                           ``F % m == 0``
``layers.down_w [L,F,D]``                   input (MLP width)                            ``F % m == 0``
``embed [V,D]`` / ``lm_head [D,V]``         vocabulary                                   ``V % m == 0``
norms                                       replicated
==========================================  ===========================================  ================

KV heads that do not divide (``Hkv < m``, GQA): the K/V projections are replicated, every model shard
computes all KV heads (the usual "replicate KV heads" rule of tensor parallelism) and the KV cache is
replicated over ``"model"`` while the query heads, the attention output and the MLP stay sharded.

Vision tower (same rule): ``qkv_w [L,D,3D]`` / ``qkv_b`` over the output and ``proj_w [L,D,D]`` over the
input when ``num_heads % m == 0``; ``gate_w/up_w`` / biases over ``F``, ``down_w`` over its input; merger
``fc1 [4D,4D]`` over the output and ``fc2 [4D,out]`` over the input when ``4D % m == 0``; the patch
embedding and the norms are replicated.

KV cache (:func:`cache_specs`): ``k``/``v [L,B,Hkv,C,hd]`` and ``valid [L,B,Hkv,C]`` have the batch over
``"data"`` (when ``B`` is a multiple of the data axis, else replicated) and the KV heads over ``"model"``
(when ``Hkv % m == 0``); the per-row vectors ``[B]`` follow the batch.

Multi-host: :func:`initialize_distributed` calls :func:`jax.distributed.initialize` when the environment
describes a multi-process job (``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID``,
or a cluster JAX detects itself: SLURM, Open MPI, Cloud TPU pods, Kubernetes), before any device is
touched. Host inputs go onto global meshes through :func:`jax.make_array_from_callback` (every process
holds the same host batch).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .cache import KVCache, QuantizedKV
from .param_tree import abstract_params, leaf_names, path_name

DATA = "data"
MODEL = "model"
AXES = (DATA, MODEL)


class ShardingError(ValueError):
    """A mesh description or a sharding request that cannot work (axis names, sizes, device counts)."""


# ------------------------------------------------------------------------------------------ meshes
def parse_mesh_spec(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """``"data=4,model=2"`` -> ``{"data": 4, "model": 2}``; a missing axis is 1; at most one ``-1``
    (filled in by :func:`make_mesh`). ``None`` / ``""`` -> ``{"data": -1, "model": 1}`` (all devices on
    the data axis)."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return {DATA: -1, MODEL: 1}
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
    else:
        items = []
        for part in spec.split(","):
            if not part.strip():
                continue
            name, eq, size = part.partition("=")
            if not eq:
                raise ShardingError(f"mesh spec {spec!r}: {part.strip()!r} is not NAME=SIZE (e.g. data=4,model=2)")
            items.append((name.strip(), size.strip()))
    out: dict[str, int] = {}
    for name, size in items:
        if name not in AXES:
            raise ShardingError(f"mesh spec {spec!r}: unknown axis {name!r}; the axes are {AXES}")
        if name in out:
            raise ShardingError(f"mesh spec {spec!r}: axis {name!r} given twice")
        try:
            n = int(size)
        except (TypeError, ValueError):
            raise ShardingError(f"mesh spec {spec!r}: size of {name!r} is {size!r}, not an integer") from None
        if n < 1 and n != -1:
            raise ShardingError(f"mesh spec {spec!r}: size of {name!r} is {n}; sizes are >= 1 (or -1 for the rest)")
        out[name] = n
    for name in AXES:
        out.setdefault(name, 1)
    if sum(v == -1 for v in out.values()) > 1:
        raise ShardingError(f"mesh spec {spec!r}: only one axis may be -1")
    return {name: out[name] for name in AXES}


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``("data", "model")`` mesh over ``devices`` (default: all devices, every process).

    The axis sizes must multiply to the number of devices (one may be ``-1``). Model-axis neighbours are
    adjacent devices (fast links on GPU nodes / TPU slices: tensor parallelism talks most).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec)
    n = len(devices)
    known = math.prod(v for v in sizes.values() if v != -1)
    for name, v in sizes.items():
        if v == -1:
            if n % known:
                raise ShardingError(f"mesh {_fmt(sizes)}: {n} devices are not a multiple of {known}")
            sizes[name] = n // known
    if math.prod(sizes.values()) != n:
        raise ShardingError(
            f"mesh {_fmt(sizes)} needs {math.prod(sizes.values())} devices, but there are {n} "
            f"({jax.default_backend()}); on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count={math.prod(sizes.values())} "
            f"simulates more"
        )
    try:
        grid = mesh_utils.create_device_mesh((sizes[DATA], sizes[MODEL]), devices=devices)
    except Exception:  # pragma: no cover - topologies mesh_utils does not know: plain order
        grid = np.asarray(devices, dtype=object).reshape(sizes[DATA], sizes[MODEL])
    return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _fmt(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def mesh_str(mesh: Mesh) -> str:
    """``"data=4,model=2"``."""
    return _fmt(dict(mesh.shape))


def _axis(mesh_or_size, name: str) -> int:
    """Size of axis ``name`` of a Mesh, of a ``{"data": d, "model": m}`` mapping, or an int (the size)."""
    if isinstance(mesh_or_size, Mesh):
        return int(mesh_or_size.shape.get(name, 1))
    if isinstance(mesh_or_size, Mapping):
        return int(mesh_or_size.get(name, 1))
    return int(mesh_or_size)


# ------------------------------------------------------------------------------------------ multi-host
_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def multihost_env(env: Mapping[str, str] | None = None) -> str | None:
    """Which multi-process launcher the environment shows (``"jax"``, ``"slurm"``, ``"mpi"``, ``"tpu"``,
    ``"k8s"``), or None for a single process."""
    env = os.environ if env is None else env
    if all(env.get(k) for k in _DISTRIBUTED_ENV) and int(env["JAX_NUM_PROCESSES"]) > 1:
        return "jax"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_STEP_NODELIST"):
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "mpi"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1:
        return "tpu"
    if env.get("JOBSET_NAME") and int(env.get("JAX_NUM_PROCESSES", "1") or 1) > 1:
        return "k8s"
    return None


_INITIALIZED = False


def initialize_distributed(env: Mapping[str, str] | None = None, *, force: bool = False,
                           heartbeat_timeout_s: int = 100) -> bool:
    """Calls :func:`jax.distributed.initialize` once when the environment describes a multi-process job
    (see :func:`multihost_env`), or always with ``force`` (Cloud TPU VMs, whose worker list JAX reads from
    the metadata server); must run before any device is used. Returns True if it initialised.

    CPU collectives go through gloo (the multi-process CPU backend; accelerators are not affected).
    ``heartbeat_timeout_s``: after this long without a heartbeat JAX's coordination service takes a process
    as dead and aborts the others (:class:`purekv_jax.multihost.JobTimeouts` sets it longer than its own
    watchdog, which stops every process with one clear line first)."""
    global _INITIALIZED
    env = os.environ if env is None else env
    kind = multihost_env(env)
    if _INITIALIZED or (kind is None and not force):
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if kind == "jax":
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
            heartbeat_timeout_seconds=int(heartbeat_timeout_s),
        )
    else:  # JAX's cluster auto-detection (SLURM, Open MPI, GCE TPU, Kubernetes)
        jax.distributed.initialize(heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    _INITIALIZED = True
    return True


# ------------------------------------------------------------------------------------------ params
def _divides(n: int, m: int) -> bool:
    return m == 1 or (n > 0 and n % m == 0)


def _spec(ndim: int, dim: int | None, ok: bool) -> P:
    """A PartitionSpec with ``"model"`` on ``dim`` (negative allowed) when ``ok``, else replicated."""
    if dim is None or not ok:
        return P()
    parts: list[str | None] = [None] * ndim
    parts[dim] = MODEL
    return P(*parts)


def param_spec(name: str, ndim: int, config, model_size: int | Mesh) -> P:
    """The PartitionSpec of one params leaf, by its dotted name (``"text.layers.q_w"``; a text
    model's state gives ``"layers.q_w"``) and rank. ``config``: a ``Qwen25VLConfig`` (or a ``TextConfig``
    for text leaves). See the module doc for the rule."""
    m = _axis(model_size, MODEL)
    text = getattr(config, "text", config)
    vision = getattr(config, "vision", None)
    parts = name.split(".")
    if parts[0] == "vision":
        if vision is None:
            raise ShardingError(f"param {name}: a vision leaf needs the full Qwen25VLConfig")
        return _vision_spec(parts[-1], ndim, vision, m)
    leaf = parts[-1]
    heads_q, heads_kv = text.num_attention_heads, text.num_key_value_heads
    if "layers" in parts:
        rules = {
            "q_w": (-1, heads_q), "q_b": (-1, heads_q), "o_w": (-2, heads_q),
            "k_w": (-1, heads_kv), "k_b": (-1, heads_kv), "v_w": (-1, heads_kv), "v_b": (-1, heads_kv),
            "gate_w": (-1, text.intermediate_size), "up_w": (-1, text.intermediate_size),
            "down_w": (-2, text.intermediate_size),
        }
        if leaf in rules:
            dim, count = rules[leaf]
            return _spec(ndim, dim, _divides(count, m))
        return P()  # norms
    if leaf == "embed":
        return _spec(ndim, 0, _divides(text.vocab_size, m))
    if leaf == "lm_head":
        return _spec(ndim, -1, _divides(text.vocab_size, m))
    return P()  # final norm


def _vision_spec(leaf: str, ndim: int, cfg, m: int) -> P:
    heads, width, merged = cfg.num_heads, cfg.intermediate_size, cfg.hidden_size * cfg.merge_unit
    rules = {
        "qkv_w": (-1, heads), "qkv_b": (-1, heads), "proj_w": (-2, heads),
        "gate_w": (-1, width), "gate_b": (-1, width), "up_w": (-1, width), "up_b": (-1, width),
        "down_w": (-2, width),
        "merger_fc1_w": (-1, merged), "merger_fc1_b": (-1, merged), "merger_fc2_w": (-2, merged),
    }
    if leaf in rules:
        dim, count = rules[leaf]
        # qkv: the output is [q | k | v], each heads*hd wide; an even split of 3*D over m keeps whole heads
        # per shard exactly when D's heads divide (XLA reshards at the q/k/v split either way).
        return _spec(ndim, dim, _divides(count, m))
    return P()


def param_specs(params, config, model_size: int | Mesh):
    """A pytree like ``params`` (arrays or ``ShapeDtypeStruct``) holding each leaf's PartitionSpec."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    specs = [param_spec(path_name(p), len(x.shape), config, model_size) for p, x in flat]
    return jax.tree_util.tree_unflatten(treedef, specs)


def sharding_for_leaf(config, mesh: Mesh):
    """A callable ``leaf name -> NamedSharding`` (the other form ``load_checkpoint`` accepts); the rank is
    looked up from the config's abstract params."""
    abstract = abstract_params(config)
    ranks = dict(zip(leaf_names(abstract), (len(x.shape) for x in jax.tree_util.tree_leaves(abstract))))

    def fn(name: str) -> NamedSharding:
        if name not in ranks:
            raise ShardingError(f"unknown params leaf {name!r}")
        return NamedSharding(mesh, param_spec(name, ranks[name], config, mesh))

    return fn


def shard_params(params, config, mesh: Mesh):
    """Places ``params`` (host or device arrays, the same values in every process) on ``mesh`` by the rule."""
    specs = param_specs(params, config, mesh)
    return jax.tree.map(lambda x, s: put(x, NamedSharding(mesh, s)), params, specs)


# ------------------------------------------------------------------------------------------ arrays
def put(x, sharding: jax.sharding.Sharding) -> jax.Array:
    """Places ``x`` with ``sharding``. Single process: ``jax.device_put``; several processes: built from
    every process's identical host copy with :func:`jax.make_array_from_callback`."""
    if x is None:
        return None
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def batch_spec(shape: Sequence[int], batch_dim: int | None, mesh: Mesh) -> P:
    """``"data"`` on ``batch_dim`` when that size is a multiple of the data axis, else replicated."""
    d = _axis(mesh, DATA)
    if batch_dim is None or d == 1 or shape[batch_dim] % d:
        return P()
    parts: list[str | None] = [None] * len(shape)
    parts[batch_dim] = DATA
    return P(*parts)


def shard_batch(x, mesh: Mesh, batch_dim: int | None = 0):
    """``x`` with its batch dimension over ``"data"`` (replicated when it does not divide; None passes)."""
    if x is None:
        return None
    return put(x, NamedSharding(mesh, batch_spec(np.shape(x), batch_dim, mesh)))


def shard_batch_args(args: Sequence[Any], batch_dims: Sequence[int | None], mesh: Mesh) -> tuple:
    """:func:`shard_batch` over parallel sequences of arrays and batch dims (None: replicate)."""
    return tuple(shard_batch(a, mesh, d) for a, d in zip(args, batch_dims))


def params_mesh(params) -> Mesh | None:
    """The mesh the params live on (the first leaf with a ``NamedSharding`` on more than one device), or
    None: then ``generate`` runs on the default device."""
    for x in jax.tree_util.tree_leaves(params):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh
    return None


# ------------------------------------------------------------------------------------------ KV cache
def cache_specs(text_config, batch: int, mesh: Mesh | Mapping[str, int], kv_bits: int | None = None):
    """A :class:`~purekv_jax.cache.KVCache` of PartitionSpecs: batch over ``"data"``, KV heads over
    ``"model"`` (each only when it divides). ``mesh``: a Mesh or its axis sizes; ``kv_bits``: a quantised
    cache's code width (its ``quant`` fields, ``[L, B, Hkv, ...]`` too, get the same rule), None: no ``quant``."""
    d, m = _axis(mesh, DATA), _axis(mesh, MODEL)
    b = DATA if d > 1 and batch % d == 0 else None
    h = MODEL if m > 1 and _divides(text_config.num_key_value_heads, m) else None
    slots, entries = P(None, b, h, None), P(None, b, h, None, None)
    quant = None if kv_bits is None else QuantizedKV(
        k_codes=entries, k_scale=entries, k_zero=entries, v_codes=entries, v_scale=entries, v_zero=entries,
        valid=slots, bits=kv_bits)
    return KVCache(
        k=entries, v=entries, valid=slots,
        length=P(b), next_position=P(b), rope_delta=P(b), token_index=slots, quant=quant,
    )

