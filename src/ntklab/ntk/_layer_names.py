"""The layers of a parameter pytree: its leaves grouped by their path without the last key.

    layer_names({"Conv_0": {"kernel": k, "bias": b}, "Block_0": {"Dense_0": {...}}})
    # -> ["Conv_0", "Block_0/Dense_0"]
    names, owners = leaf_layers(params)      # owners[i]: the layer of leaf i (flatten order)

A layer is named by the keys of its leaves' path but the last, joined with "/"; a leaf directly
at the top level of the tree is its own layer, named by its key. Layers are listed in the order
their first leaf appears when mappings are read in insertion order (a Flax model's creation
order: ``Conv_0`` before ``Block_0`` above, ``Dense_2`` before ``Dense_10``), other containers in
their pytree order; ``owners`` follows ``jax.tree.flatten``'s leaf order (sorted dict keys). A
leaf belongs to the layer whose path holds it, whoever uses it (a tied weight counts for the
module that owns it).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import jax

from ntklab.types import PyTree


def layer_names(params: PyTree) -> list[str]:
    """The layers of a parameter pytree, in the order of their first leaf.

    Args:
      params: a parameter pytree (e.g. a Flax ``variables["params"]``).

    Returns:
      one name per layer: the keys of its leaves' path without the last, joined with "/"
      (a leaf at the top level: its own key).
    """
    return list(leaf_layers(params)[0])


def leaf_layers(params: PyTree) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The layer names of :func:`layer_names` and, per leaf in flatten order, its layer's index."""
    names: dict[str, int] = {}
    for keys in _insertion_order_paths(params, ()):
        names.setdefault(_layer_of(keys), len(names))
    owners = [
        names[_layer_of(tuple(_key_name(key) for key in path))]
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    ]
    return tuple(names), tuple(owners)


def _layer_of(keys: tuple[str, ...]) -> str:
    """A leaf's layer: its path without the last key (a top-level leaf: its key; a bare array
    as the whole tree: ``<root>``)."""
    if not keys:
        return "<root>"
    return "/".join(keys[:-1]) if len(keys) > 1 else keys[0]


def _insertion_order_paths(tree: PyTree, prefix: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    """Every leaf's path as text, mappings read in insertion order."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _insertion_order_paths(value, (*prefix, str(key)))
        return
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield (*prefix, *(_key_name(key) for key in path))


def _key_name(key: object) -> str:
    """A path entry as text: a dict key, an attribute name or a sequence index."""
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)
