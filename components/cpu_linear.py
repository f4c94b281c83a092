"""Decode steps on the CPU through oneDNN's packed linear layers.

A decode step multiplies a few rows (the batch, one token each) by every weight matrix. torch's CPU BLAS does
that far below the machine's peak; oneDNN, given the weight once in its own blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, for a known number of rows), does the same product faster, enough to
pay for packing every weight at the start of a rollout's decode loop (bench/bench_sampler.py --switch pack measures it).
Same fp32 math; the sums are taken in another order, so results differ from the BLAS ones by rounding.

`packed_linears(model, rows)` runs every fp32 `torch.nn.Linear` of the model through a packed copy of its weight
inside the block and drops the copies after it (while it runs, the packed copies double the memory of those
weights, so a model whose linear weights exceed MAX_PACKED_BYTES keeps the plain products). A LoRA adapter's own small matrices (peft's lora_A / lora_B) keep the plain product. Sampling with the
LoRA adapter merged into temporary weights (the engines' default for an fp32 base) or unmerged measured the same.
"""
from __future__ import annotations

import contextlib

import torch


MAX_PACKED_BYTES = 4 << 30
"""The most bytes of weights packed at once (a second copy of them lives while the block runs)."""


def packing_available() -> bool:
    """oneDNN's packed fp32 linear is in this torch build (x86 CPUs; not everywhere torch runs)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") \
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _lora_pieces(model: torch.nn.Module) -> set[int]:
    """ids of the modules that are a LoRA adapter's own matrices (peft keeps them in ModuleDicts by adapter)."""
    return {id(x) for m in model.modules() for name in ("lora_A", "lora_B")
            if isinstance(getattr(m, name, None), torch.nn.ModuleDict) for x in getattr(m, name).values()}


def _packable(m: torch.nn.Module, lora: set[int]) -> bool:
    w = getattr(m, "weight", None)
    return type(m) is torch.nn.Linear and w is not None and w.dtype == torch.float32 and w.device.type == "cpu" \
        and id(m) not in lora


def _forward(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module, rows: int, enabled: bool = True):
    """Inside: the model's fp32 CPU linear layers multiply through oneDNN weights packed for `rows` input
    rows (module docs). No-op where oneDNN is missing, `enabled` is False or the weights exceed MAX_PACKED_BYTES;
    yields whether it applied."""
    if not enabled or not packing_available():
        yield False
        return
    lora = _lora_pieces(model)
    layers = [m for m in model.modules() if _packable(m, lora)]
    if sum(m.weight.numel() * m.weight.element_size() for m in layers) > MAX_PACKED_BYTES:
        yield False
        return
    swapped = []
    try:
        with torch.no_grad():
            for m in layers:
                    packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows)
                    # an instance-level forward (accelerate's offload hooks put one there) comes back on exit
                    swapped.append((m, m.__dict__.get("forward")))
                    m.forward = lambda x, p=packed, b=m.bias: _forward(p, b, x)
        yield bool(swapped)
    finally:
        for m, before in swapped:
            if before is None:
                del m.forward
            else:
                m.forward = before
