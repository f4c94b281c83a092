"""A LoRA forward with the scaled add inside the matrix multiply, for training passes.

peft's LoRA linear computes `base(x) + lora_B(lora_A(x)) * scaling`: the LoRA output [N, out] is scaled by a
separate multiply and added by a separate add, each one more pass over an [N, out] tensor in the forward
pass, and the multiply again in the backward pass. On a CPU those elementwise passes were ~12% of a PPO
training phase (torch.profiler: aten::mul + aten::add 0.93 s of 7.5 s). Here the LoRA product is accumulated
into the base result by one in-place `addmm_(x A^T, B^T, alpha=scaling)`; the weights and the math are peft's.

    with fused_lora(model):      # model: a PeftModel (or anything holding peft LoRA Linear layers)
        loss = ...; loss.backward()

Only the plain case is fused: one active adapter, no dropout, no DoRA or other variant, an unquantised
nn.Linear base of the input's dtype, no autocast. Every other call goes to peft's own forward, so
enabling, disabling or switching adapters inside the block behaves exactly as without it.
"""
from __future__ import annotations

import contextlib
import types

import torch
from torch import nn


def _lora_linear_type():
    from peft.tuners.lora.layer import Linear
    return Linear


def _fusable(layer, x: torch.Tensor, args, kwargs) -> str | None:
    """The active adapter's name when this call can take the fused path, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged or torch.is_autocast_enabled():
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if not isinstance(layer.lora_dropout[name], nn.Identity):
        return None
    base = layer.base_layer
    if type(base) is not nn.Linear or base.weight.dtype != x.dtype:
        return None
    if layer.lora_A[name].weight.dtype != x.dtype or layer.lora_B[name].weight.dtype != x.dtype:
        return None
    return name


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _fusable(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    x2 = x.reshape(-1, x.shape[-1])
    out = nn.functional.linear(x2, base.weight, base.bias)            # [N, out]: a fresh tensor
    # autograd saves the inputs of linear/addmm, not their outputs, so accumulating in place is safe
    out.addmm_(x2 @ self.lora_A[name].weight.t(), self.lora_B[name].weight.t(), alpha=self.scaling[name])
    return out.view(*x.shape[:-1], out.shape[-1])


@contextlib.contextmanager
def fused_lora(model: nn.Module):
    """Within the block, peft LoRA Linear layers of `model` use the fused forward (see module docs)."""
    linear = _lora_linear_type()
    layers = [m for m in model.modules() if isinstance(m, linear)]
    for m in layers:
        m.forward = types.MethodType(_fused_forward, m)
    try:
        yield model
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
