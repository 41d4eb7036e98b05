"""A KV cache that grows in place: transformers' ``DynamicCache`` with preallocated layers.

``DynamicLayer.update`` concatenates, which copies the whole cache of a layer at every decode
step (``B x Hkv x kv x D`` per layer, quadratic over a generation). `SlotLayer` keeps K/V in a
buffer with spare room, writes each step's rows in place and hands attention a view; cropping
(the probe slot, every check step) only moves the length back. The batch operations of
`decode.DecodeBatch` (merge, pad, select, trim) assign ``layer.keys`` / ``layer.values``,
which re-buffers with room to grow. Our choice, as in vLLM's and TGI's preallocated caches.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _room(n: int) -> int:
    """Buffer length for ``n`` slots: half again, at least 64 more (amortised O(1) growth)."""
    return n + max(64, n // 2)


def _buffer(t: torch.Tensor, capacity: int) -> torch.Tensor:
    buf = t.new_empty(t.shape[0], t.shape[1], capacity, t.shape[3])
    buf[:, :, :t.shape[2]] = t
    return buf


class SlotLayer(DynamicLayer):
    """One layer's K/V: ``(B, Hkv, capacity, D)`` buffers; ``keys``/``values`` are the
    ``(B, Hkv, n, D)`` views of the ``n`` used slots."""

    def __init__(self):
        self._k = self._v = None
        self._nk = self._nv = 0  # used slots; equal except between the two assignments
        super().__init__()

    @property
    def keys(self):
        return None if self._k is None else self._k[:, :, :self._nk]

    @keys.setter
    def keys(self, t):
        self._k = None if t is None else _buffer(t, _room(t.shape[2]))
        self._nk = 0 if t is None else t.shape[2]

    @property
    def values(self):
        return None if self._v is None else self._v[:, :, :self._nv]

    @values.setter
    def values(self, t):
        self._v = None if t is None else _buffer(t, _room(t.shape[2]))
        self._nv = 0 if t is None else t.shape[2]

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, m = self._nk, key_states.shape[2]
        k, v = self.reserve(m)
        k[:, :, n:n + m] = key_states
        v[:, :, n:n + m] = value_states
        self.advance(m)
        return self.keys, self.values

    def reserve(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(B, Hkv, capacity, D)`` K and V buffers, grown to hold ``m`` more slots (for a
        forward that writes them itself, `compiled.CompiledStep`; then `advance`)."""
        n = self._nk
        if n + m > self._k.shape[2]:
            self._k, self._v = _buffer(self.keys, _room(n + m)), _buffer(self.values, _room(n + m))
        return self._k, self._v

    def advance(self, m: int) -> None:
        """Count ``m`` more used slots (written into the `reserve` buffers)."""
        self._nk = self._nv = self._nk + m

    def get_seq_length(self) -> int:
        return self._nk

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` slots (negative, as `DynamicLayer.crop`)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of slots to remove")
        self._nk = self._nv = max(0, self._nk + tokens_to_remove)


class SlotCache(DynamicCache):
    """``DynamicCache`` whose layers are `SlotLayer`s (full-attention models only).

    Raises:
        ValueError: the model has sliding-window or other non-full-attention layers.
    """

    def __init__(self, config):
        super().__init__(config=config)
        if any(type(layer) is not DynamicLayer for layer in self.layers):
            raise ValueError("SlotCache supports full-attention layers only")
        self.layers = [SlotLayer() for _ in self.layers]

    def reserve(self, m: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every layer's K and V buffers with room for ``m`` more slots (`SlotLayer.reserve`)."""
        pairs = [layer.reserve(m) for layer in self.layers]
        return [k for k, _ in pairs], [v for _, v in pairs]

    def advance(self, m: int) -> None:
        """`SlotLayer.advance` on every layer."""
        for layer in self.layers:
            layer.advance(m)
