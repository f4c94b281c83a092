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

Mixed precision (a bf16/fp16 base with peft's fp32 adapters, the GPU case): peft casts each LoRA layer's input
to fp32 and autograd keeps that copy, 4 bytes per input feature per token in every adapted layer (~11 GiB by
components/training/memory.py's count for a PPO micro-batch of 32 x 192 tokens at the 1.7B shape, whose measured peak
was 31 GiB). `_AdapterTerm` computes the same fp32 LoRA term in one autograd node that
keeps the half-precision input (2 bytes) and the [N, r] product instead, and casts in the backward pass.

`fused_lora(model, half=True)` instead runs the LoRA matmuls in the base's half dtype, with the fp32 adapter
weights rounded to it, as bf16 autocast does: fp32 accumulation inside each matmul. On a GPU the fp32 path is
slow work: every LoRA layer's [N, out] base output and gradient are cast to fp32 and back, and its fp32 matmuls
miss the tensor cores (an H100 profile of a PPO step at the 1.7B shape: fp32 GEMMs 8%, copies 15% of the GPU
time). The adapters, their gradients and the optimizer stay fp32. Plain autograd serves here: it keeps the
same tensors a custom node would (the half input, shared with the base layer, and the [N, r] product).

Under torch.compile the LoRA term is added out of place, `base + t @ (s B)^T`, so that inductor can leave the
two matmuls apart and fold the add into the kernel that reads the layer's output next. The in-place `addmm_`
that eager mode uses becomes, in a compiled graph, an addmm that first copies the whole [N, out] base output
(an H100 profile of the compiled 1.7B training phase: 672 such copies, 5% of its GPU time). Measured after the
change (docs/GPU.md, run 9): inductor still fuses most of these adds back into an addmm, 589 copies remain.

Sibling layers that read one input (q/k/v, gate/up: `SIBLING_SETS`) share one x A^T matmul (`_Siblings`): one
skinny GEMM instead of three or two, forward and backward. fused_lora(siblings=False) keeps one per layer.

The siblings' base matmuls were once stacked too (one x [W_q; W_k; W_v]^T product inside compiled graphs): on an
H200 at the 1.7B shape that trained 0.96x as fast as three narrow products, on a 2-thread CPU 0.76x, and held a
2.2 GiB copy of the weights, so it was dropped (docs/GPU.md, run 12).
"""
from __future__ import annotations

import contextlib
import types

import torch
from torch import nn


# the default of fused_lora(siblings=...); the GPU bench flips it to time both
SHARE_SIBLING_INPUTS = True


def _lora_linear_type():
    from peft.tuners.lora.layer import Linear
    return Linear


def _fusable(layer, x: torch.Tensor, args, kwargs) -> str | None:
    """The active adapter's name when this call can take a fused path, else None."""
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
    a_dtype, b_dtype = layer.lora_A[name].weight.dtype, layer.lora_B[name].weight.dtype
    if a_dtype != b_dtype or not (a_dtype == x.dtype or (a_dtype == torch.float32 and x.dtype in _HALF)):
        return None
    return name


_HALF = (torch.float16, torch.bfloat16)


class _AdapterTerm(torch.autograd.Function):
    """y = base_out + s * (x A^T) B^T with fp32 matmuls, rounded once to x's dtype: peft's mixed-precision
    result. x [N, in] half, a [r, in] fp32, b [out, r] fp32, base_out [N, out] half (the base layer's output,
    whose own autograd node carries the base gradient). Keeps x (half) and t = x A^T ([N, r] fp32) instead of
    an fp32 copy of x; the gradients of A and B come back as fp32.
    """

    @staticmethod
    def forward(ctx, x, a, b, base_out, scaling: float):
        t = x.float() @ a.t()
        y = torch.addmm(base_out.float(), t, b.t(), alpha=scaling).to(x.dtype)
        ctx.save_for_backward(x, a, b, t)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, gy):
        x, a, b, t = ctx.saved_tensors
        s = ctx.scaling
        g = gy.float()
        gt = (g @ b).mul_(s)                                           # d loss / d t   [N, r]
        grad_x = (gt @ a).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_a = gt.t() @ x.float() if ctx.needs_input_grad[1] else None
        grad_b = (g.t() @ t).mul_(s) if ctx.needs_input_grad[2] else None
        return grad_x, grad_a, grad_b, gy if ctx.needs_input_grad[3] else None, None


def _fused_forward(self, x: torch.Tensor, *args, half: bool = False, **kwargs) -> torch.Tensor:
    name = _fusable(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    x2 = x.reshape(-1, x.shape[-1])
    a, b, s = self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name])
    group, index = self.__dict__.get(_SIBLINGS, (None, 0))
    out = nn.functional.linear(x2, base.weight, base.bias)            # [N, out]: a fresh tensor
    if a.dtype != x.dtype and not half:                                # fp32 adapter math on a half base
        out = _AdapterTerm.apply(x2, a, b, out, s)
        return out.view(*x.shape[:-1], out.shape[-1])
    if group is not None and group.enabled:
        t = group.a_product(index, x, x2, name)                          # [N, r]
    else:
        t = x2 @ a.to(x.dtype).t()
    if torch.compiler.is_compiling():
        # out of place, so inductor may fold the add into the next kernel instead of copying `out` (module docs)
        out = out + t @ (b * s).to(x.dtype).t()
    else:
        # autograd saves the inputs of linear/addmm, not their outputs, so accumulating in place is safe
        out.addmm_(t, b.to(x.dtype).t(), alpha=s)
    return out.view(*x.shape[:-1], out.shape[-1])


# Sibling projections that read the same input in the decoders transformers ships (Llama, Qwen2, Mistral, Gemma,
# SmolLM2): attention's q/k/v and the gated MLP's gate/up. Named, because structure alone cannot tell them from
# o_proj, which has q's shape but reads attention's output. The input is still compared at run time.
SIBLING_SETS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_SIBLINGS = "_fused_lora_siblings"


class _Siblings:
    """LoRA layers that read one input: the first of them to see a new input computes every sibling's x A^T in
    one matmul, x [N, in] @ [A_1; A_2; ...]^T, and the others take their slice of it. One skinny GEMM instead of
    three (q/k/v) or two (gate/up) reads x once, and in the backward pass autograd forms x's gradient and the
    A gradients with one GEMM each as well. The same products, so the same math as one matmul a layer.

    One object per set of layers for the model's lifetime: torch.compile guards on the objects a compiled layer
    reads, and a new one per fused_lora block would recompile every PPO step."""

    def __init__(self, layers: list):
        self.layers = layers
        self.enabled = True
        self.x = None            # the input the held products belong to
        self.held = []           # [N, r_i] products not yet taken, None where taken or not computed

    def a_product(self, i: int, x: torch.Tensor, x2: torch.Tensor, name: str) -> torch.Tensor:
        """Layer i's x A^T, [N, r]: taken from the held products when they belong to this x, else computed."""
        if self.x is x and self.held[i] is not None:
            t, self.held[i] = self.held[i], None
        else:
            t = self._compute(i, x, x2, name)
        if all(h is None for h in self.held):      # all taken: do not keep x or products alive past their use
            self.x, self.held = None, []
        return t

    def _compute(self, i: int, x: torch.Tensor, x2: torch.Tensor, name: str) -> torch.Tensor:
        # siblings whose call with this input would take the same fused path, with adapters of one dtype
        a_dtype = self.layers[i].lora_A[name].weight.dtype
        joins = [j == i or (_fusable(m, x, (), {}) == name and m.lora_A[name].weight.dtype == a_dtype)
                 for j, m in enumerate(self.layers)]
        weights = [m.lora_A[name].weight for m, join in zip(self.layers, joins) if join]
        products = (x2 @ torch.cat(weights).to(x.dtype).t()).split([w.shape[0] for w in weights], dim=1)
        held, k = [], 0
        for j, join in enumerate(joins):
            held.append(products[k] if join else None)
            k += join
        t, held[i] = held[i], None
        self.x, self.held = x, held
        return t


def _siblings_of(model: nn.Module, linear) -> list[_Siblings]:
    """Each set of sibling LoRA layers' (SIBLING_SETS) one _Siblings object, made on first use."""
    groups = []
    for parent in model.modules():
        for names in SIBLING_SETS:
            layers = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, linear) for m in layers):
                continue
            if _SIBLINGS not in layers[0].__dict__:
                group = _Siblings(layers)
                for i, m in enumerate(layers):
                    m.__dict__[_SIBLINGS] = (group, i)
            groups.append(layers[0].__dict__[_SIBLINGS][0])
    return groups


def _fused_forward_half(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # one module-level function, not a partial per block: torch.compile guards on the identity of the layers'
    # forward functions, and a new one per training phase would recompile every step
    return _fused_forward(self, x, *args, half=True, **kwargs)


@contextlib.contextmanager
def fused_lora(model: nn.Module, half: bool = False, siblings: bool | None = None):
    """Within the block, peft LoRA Linear layers of `model` use the fused forward (see module docs). half: fp32
    adapters on a half-precision base run their matmuls in the base's dtype instead of fp32. siblings: layers
    that read one input share one x A^T matmul (`_Siblings`; default `SHARE_SIBLING_INPUTS`)."""
    linear = _lora_linear_type()
    layers = [m for m in model.modules() if isinstance(m, linear)]
    groups = _siblings_of(model, linear)
    for group in groups:
        group.enabled = SHARE_SIBLING_INPUTS if siblings is None else siblings
    forward = _fused_forward_half if half else _fused_forward
    for m in layers:
        m.forward = types.MethodType(forward, m)
    try:
        yield model
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
        for group in groups:                      # an exception mid-pass may leave products held
            group.x, group.held = None, []
