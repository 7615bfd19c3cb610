"""Linear layers with their weights held transposed, for decoding on the CPU in float32.

``nn.Linear`` keeps its weight as ``[out, in]`` and hands it to MKL's sgemm to be used
transposed; for the few rows a decoding step has, that layout is slow. The same product taken
as ``x @ weight_t`` with ``weight_t`` a contiguous ``[in, out]`` copy is much faster there, and
as fast for a prefill's hundreds of rows. Measured side by side (AMD EPYC, AVX2, torch 2.13 with
MKL, 2 threads):

* one ``[1024 -> 2816]`` matmul alone: 12.8 -> 21.1 GFLOP/s at 8 rows, 34.1 -> 43.4 at 32,
  66.0 -> 66.3 at 800;
* a 200M random Llama (``benchmarks/random_llama.py``: hidden 1024, 16 layers, intermediate
  2816), medians of 6: a decoding step over a 40-position cache, 32 rows 513 -> 409 ms (1.25x),
  8 rows 281 -> 233 ms (1.21x); a packed prefill of 800 tokens 6.4-6.6 -> 6.3 s (the same);
  32 requests of 32 tokens through the model service (prefill and every step) 23.3 -> 20.8 s
  (1.12x);
* the default model (hidden 128) is too small to tell: its steps are Python overhead
  (32 rows 9.1 vs 9.3 ms).

The numbers are nearly the same: logits equal bit for bit from some 20 rows on, and a few
float32 ulps apart for one row (another kernel: at most 1.4e-5 on the default model's logits of
up to 24); greedy replies, batched or plain ``generate``, are the same tokens (32 prompts on
the default model and on the 200M one).

The model service (:meth:`model.service.ModelService.load`) converts the models it serves on
the CPU in float32 (:func:`speeds_up`); CUDA and other dtypes keep ``nn.Linear``. Conversion is
for serving only: the converted modules have no ``weight`` parameter, so a converted model
cannot be saved, trained or have its weights tied again.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TransposedLinear", "speeds_up", "transpose_linear_layers"]


class TransposedLinear(nn.Module):
    """``nn.Linear``'s product with the weight held as ``weight_t`` (``[in, out]``,
    contiguous)."""

    weight_t: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self, weight_t: nn.Parameter, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight_t.shape
        self.weight_t = weight_t
        self.register_parameter("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> TransposedLinear:
        """A copy of ``linear`` with its weight transposed (``linear`` is left as is; the bias
        is shared)."""
        weight = linear.weight
        weight_t = weight.detach().t().contiguous()
        return cls(nn.Parameter(weight_t, requires_grad=weight.requires_grad), linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The ``[out, in]`` weight, a view of ``weight_t`` (for code that reads it)."""
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ``weight_t.t()`` is a transposed view, so this is ``x @ weight_t`` (plus the bias).
        return F.linear(x, self.weight_t.t(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


def speeds_up(model: Any, device: str) -> bool:
    """Whether :func:`transpose_linear_layers` helps ``model`` on ``device``: on the CPU, in
    float32, where it was measured (CUDA and other dtypes are left as they are)."""
    return device == "cpu" and getattr(model, "dtype", None) == torch.float32


def transpose_linear_layers(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` in ``model`` (the decoder layers' projections and the
    ``lm_head``) by a :class:`TransposedLinear`, in place; the number replaced.

    One layer at a time, each original weight released once its copy is made, so memory never
    holds more than one layer twice. A head tied to the input embedding gets a transposed copy
    of its own (``vocab x hidden`` more floats) and the embedding stays as it is.
    """
    # Where each layer sits (a layer may sit in more than one place), found while all are
    # alive, so that the ids stay apart.
    sites: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear:  # subclasses (quantized, LoRA...) are left alone
                sites.setdefault(id(child), []).append((parent, name))
    for places in sites.values():
        first_parent, first_name = places[0]
        converted = TransposedLinear.from_linear(getattr(first_parent, first_name))
        for parent, name in places:
            setattr(parent, name, converted)  # the last place gone, the original is freed
    return len(sites)
