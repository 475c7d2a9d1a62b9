"""Filling a module's pure state (``nnx.State``) with given arrays, and building a module around them.

The model's modules are its parameters: ``nnx.split(module)`` gives a graph definition (the module
tree, config included) and a pure state whose leaves are ``nnx.Param`` variables, one per weight, at
attribute paths such as ``("text", "layers", "q_w")``. The loaders and the ``init_*`` functions never
build a module eagerly: they take the abstract state (``nnx.eval_shape`` of the constructor, leaves of
``jax.ShapeDtypeStruct``) and fill it here, leaf by leaf, with arrays they drew or read.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, TypeVar

from flax import nnx
from flax.traverse_util import flatten_dict

ModuleT = TypeVar("ModuleT", bound=nnx.Module)


class StateLeafError(ValueError):
    """Leaves that do not fit an abstract state: a missing path, an unexpected one, or a wrong shape."""


def state_from_leaves(abstract: nnx.State, leaves: Mapping[tuple[str, ...], Any]) -> nnx.State:
    """A new state shaped like ``abstract`` whose leaf at each path holds ``leaves[path]``, as given.

    ``abstract``: a state of ``jax.ShapeDtypeStruct`` (or of arrays: only the shapes are read);
    ``leaves``: attribute path (e.g. ``("text", "layers", "q_w")``) -> array of that leaf's shape.
    Every path of ``abstract`` must be given, no other, each with the abstract leaf's shape; the first
    misfit raises :class:`StateLeafError` naming the leaf (dotted path) and both shapes. The arrays
    are not converted (convert host arrays, or cast, before), and ``abstract`` is left unchanged.
    """
    flat = nnx.to_flat_state(abstract)
    paths = {tuple(path) for path, _ in flat}
    missing = [".".join(path) for path, _ in flat if tuple(path) not in leaves]
    if missing:
        raise StateLeafError(f"missing leaf (leaves) {', '.join(missing)}")
    extra = sorted(".".join(map(str, path)) for path in leaves if tuple(path) not in paths)
    if extra:
        raise StateLeafError(f"unexpected leaf (leaves) {', '.join(extra)}")
    filled = []
    for path, variable in flat:
        value = leaves[tuple(path)]
        if tuple(value.shape) != tuple(variable.shape):
            raise StateLeafError(
                f"leaf {'.'.join(path)}: expected shape {tuple(variable.shape)}, got {tuple(value.shape)}"
            )
        filled.append((path, variable.replace(value)))
    return nnx.from_flat_state(filled)


def module_from_arrays(build: Callable[[], ModuleT], arrays: Mapping[str, Any]) -> ModuleT:
    """The module ``build()`` makes, holding ``arrays`` (nested by attribute name) as its weights.

    ``build`` runs under ``nnx.eval_shape``, so its own draws are traced, never computed: a parent
    module draws all of its arrays from one key and hands each child its part this way.
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    return nnx.merge(graphdef, state_from_leaves(abstract, flatten_dict(arrays)))
