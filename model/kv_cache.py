"""The KV cache of a running batch: cache layers that grow in place, and the reshaping that
joining and packing need (left padding, unpacking a packed prefill into rows)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def unpack_rows(packed: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """A packed cache tensor (``[1, heads, T, dim]``) as ``rows`` left-padded rows
    (``[rows, heads, width, dim]``), taking the positions ``index`` (``rows * width``)."""
    heads, dim = packed.shape[1], packed.shape[3]
    picked = packed[0].index_select(1, index)  # [heads, rows * width, dim]
    return picked.view(heads, rows, -1, dim).transpose(0, 1)


class RoomyLayer(DynamicLayer):
    """A cache layer whose keys and values are views into buffers with room to grow.

    ``DynamicLayer`` appends each decoding step with ``torch.cat``, copying the whole cache of
    every row every step; here a step writes its one position in place, and the buffers are
    copied only when they fill up or the rows change (then with room for as much again).
    """

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        needed = length + key_states.shape[-2]
        keys: Any = self.keys
        values: Any = self.values
        buffers: tuple[torch.Tensor, torch.Tensor] | None = getattr(self, "_buffers", None)
        if (
            buffers is None
            or buffers[0].shape[-2] < needed
            or buffers[0].shape[0] != key_states.shape[0]
            # keys replaced from outside (rows selected, padding cut): start a new buffer
            or (length and keys.data_ptr() != buffers[0].data_ptr())
        ):
            room = max(2 * needed, needed + 64)
            shape = (*key_states.shape[:-2], room, key_states.shape[-1])
            buffers = (key_states.new_empty(shape), value_states.new_empty(shape))
            if length:
                buffers[0][..., :length, :] = keys
                buffers[1][..., :length, :] = values
            self._buffers = buffers
        buffers[0][..., length:needed, :] = key_states
        buffers[1][..., length:needed, :] = value_states
        self.keys = buffers[0][..., :needed, :]
        self.values = buffers[1][..., :needed, :]
        return self.keys, self.values


def roomy_cache(layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache:
    """A ``DynamicCache`` of :class:`RoomyLayer`s, holding ``layers``' keys and values."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = RoomyLayer
    for keys, values in layers or []:
        layer = RoomyLayer()
        layer.update(keys, values)
        cache.layers.append(layer)
    return cache


def cache_layers(cache: DynamicCache) -> list[Any]:
    """The cache's layers: full-attention ``DynamicLayer``s, each with ``keys`` and ``values``
    of shape ``[rows, heads, T, head_dim]``."""
    return list(cache.layers)


def left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """``tensor`` with zeros in front along its sequence axis (2 for KV, 1 for a mask)."""
    axis = 2 if tensor.dim() == 4 else 1
    missing = width - tensor.shape[axis]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)
