"""Linear layers whose weights are packed once for oneDNN, for serving on the CPU in float32.

``nn.Linear`` hands its ``[out, in]`` weight to MKL's sgemm on every call, which repacks it
each time; for the few rows a decoding step has, that is most of the work, and on an AMD CPU
MKL does not use AVX-512 at all. oneDNN (bundled with every x86 build of PyTorch, the library
``torch.compile``'s CPU backend packs weights for) takes the weight reordered once, at load,
into its own blocked layout (``torch.ops.mkldnn._reorder_linear_weight``) and multiplies with
its own JIT kernels (``torch.ops.mkldnn._linear_pointwise``). Measured side by side (AMD EPYC
Zen 5, AVX-512, torch 2.13 with MKL, 2 threads), the seven products of a 200M Llama layer
(hidden 1024, intermediate 2816) over 16 layers of distinct weights, so that they come from
memory as in a real step:

* 1 row 42.3 -> 18.6-21.1 ms, 8 rows 68.8-78.7 -> 19.5-27.6 ms, 32 rows 118-155 -> 42.5 ms,
  640 rows (a packed prefill) 1664-1699 -> 710-715 ms: 2.3-3.9x, up to 370 GFLOP/s where
  MKL's ``torch.mm`` of 2048x2048 peaks at 200;
* a decoding step of the whole 200M model (``benchmarks/random_llama.py``), 32 rows 146-263 ->
  69-79 ms, 1 row 46-56 -> 27-29 ms; of the default model (hidden 128: its steps are dispatch
  overhead) 32 rows 4.4 -> 2.3 ms;
* the weights held transposed for MKL (``x @ weight_t``, what this module did before, 1.25x on
  an AVX2 EPYC with MKL) measured 155 against ``nn.Linear``'s 146 ms for the 200M step here.

The products are float32 throughout (oneDNN's default strict fp math: no bf16 inside): against
a float64 reference their error is 2.8-4.2e-6 where MKL's is 1.4-1.8e-6, and a row's product
is mostly bit for bit the same alone and in a batch (MKL's is not), so batching changes greedy
replies no more than before (tests/model/test_fast_linear.py compares them with plain
``generate``).

The model service (:meth:`model.service.ModelService.load`) packs the models it serves on the
CPU in float32 where oneDNN is present (:func:`speeds_up`), their layers of
:data:`PACKED_LAYER_MIN_WEIGHTS` and more; CUDA and other dtypes keep ``nn.Linear``. Packing
is for serving only: a packed layer has no ``weight`` parameter and no gradient, so a packed
model cannot be saved, trained or have its weights tied again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "PACKED_LAYER_MIN_WEIGHTS",
    "PackedLinear",
    "model_parameters",
    "pack_linear_layers",
    "packed_weights",
    "packing_available",
    "speeds_up",
]


def packing_available() -> bool:
    """Whether this build of PyTorch has oneDNN and its packed linear ops."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (
        torch.backends.mkldnn.is_available()
        and mkldnn is not None
        and hasattr(mkldnn, "_reorder_linear_weight")
        and hasattr(mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """``nn.Linear``'s product with the weight packed for oneDNN (``packed``, an opaque
    ``torch._mkldnn`` tensor of shape ``[out, in]``)."""

    bias: nn.Parameter | None

    def __init__(self, packed: torch.Tensor, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape
        # A plain attribute, not a parameter or buffer: an opaque tensor has no storage for
        # state_dict, .to() or parameter counts to read.
        self.packed = packed
        self.register_parameter("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        """A packed copy of ``linear`` (``linear`` is left as is; the bias is shared)."""
        weight = linear.weight.detach()
        return cls(torch.ops.mkldnn._reorder_linear_weight(weight), linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The ``[out, in]`` weight, unpacked into a new dense tensor (for code that reads it;
        not for the hot path)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # "none": no fused activation. The op takes any leading dimensions.
        return torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), self.packed, self.bias, "none", [], ""
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, packed for oneDNN"
        )


def speeds_up(model: Any, device: str) -> bool:
    """Whether :func:`pack_linear_layers` helps ``model`` on ``device``: on the CPU, in
    float32, where it was measured, with oneDNN present (CUDA and other dtypes are left as
    they are)."""
    return (
        device == "cpu" and getattr(model, "dtype", None) == torch.float32 and packing_available()
    )


#: A layer with fewer weights stays ``nn.Linear``: oneDNN's call costs some 12 us more than
#: MKL's, more than it saves on a small product. Measured on an AMD EPYC (Zen 4, 1 thread),
#: MKL against oneDNN: 352x128, 1 row 5.3 against 17.4 us, 32 rows 34 against 41 us; the
#: 3897x128 head, 1 row 63 against 49 us, 32 rows 418 against 343 us. The default model's
#: decoding step (hidden 128: only its head packed, against every layer packed), 1 row 1.49
#: against 2.14 ms, 16 rows 2.77 against 3.22, 32 rows 4.03 against 4.14. The 200M model's
#: smallest layers hold 1M weights.
PACKED_LAYER_MIN_WEIGHTS = 1 << 18


def pack_linear_layers(model: nn.Module, *, smallest: int | None = None) -> int:
    """Replace every ``nn.Linear`` in ``model`` (the decoder layers' projections and the
    ``lm_head``) with at least ``smallest`` weights (default :data:`PACKED_LAYER_MIN_WEIGHTS`)
    by a :class:`PackedLinear`, in place; the number replaced.

    One layer at a time, each original weight released once its packed copy is made, so memory
    never holds more than one layer twice. A head tied to the input embedding gets a packed
    copy of its own (``vocab x hidden`` more floats) and the embedding stays as it is.
    """
    if smallest is None:
        smallest = PACKED_LAYER_MIN_WEIGHTS
    # Where each layer sits (a layer may sit in more than one place), found while all are
    # alive, so that the ids stay apart.
    sites: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for name, child in parent.named_children():
            # Subclasses (quantized, LoRA...) are left alone.
            if type(child) is nn.Linear and child.weight.numel() >= smallest:
                sites.setdefault(id(child), []).append((parent, name))
    with torch.no_grad():
        for places in sites.values():
            first_parent, first_name = places[0]
            packed = PackedLinear.from_linear(getattr(first_parent, first_name))
            for parent, name in places:
                setattr(parent, name, packed)  # the last place gone, the original is freed
    return len(sites)


def packed_weights(model: nn.Module) -> int:
    """The weights ``model``'s packed layers hold (they are not among its parameters)."""
    layers = {id(m): m for m in model.modules() if isinstance(m, PackedLinear)}
    return sum(m.packed.numel() for m in layers.values())


def model_parameters(model: nn.Module) -> int:
    """The parameters ``model`` was saved with, packed or not: its own (each shared one once)
    and its packed layers' weights, less the packed copy of a head tied to the input
    embedding (the embedding already counts it)."""
    counted = sum(p.numel() for p in model.parameters())  # parameters() lists a shared one once
    counted += packed_weights(model)
    output_embeddings = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if callable(output_embeddings) else None
    config = getattr(model, "config", None)
    if isinstance(head, PackedLinear) and getattr(config, "tie_word_embeddings", False):
        counted -= head.packed.numel()
    return counted
