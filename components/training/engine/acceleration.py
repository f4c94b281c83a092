"""The training passes through torch.compile'd decoder layers, and how a failure of compiling is told apart."""
from __future__ import annotations

from contextlib import contextmanager

import torch


def decoder_layer_list(decoder) -> torch.nn.ModuleList:
    """The decoder's list of transformer blocks (`layers` in Llama-like models, `h` in GPT-2-like ones)."""
    n = getattr(getattr(decoder, "config", None), "num_hidden_layers", None)
    for name in ("layers", "h", "blocks"):
        mods = getattr(decoder, name, None)
        if isinstance(mods, torch.nn.ModuleList) and len(mods) and (n is None or len(mods) == n):
            return mods
    raise ValueError(f"compile: no list of decoder layers found on {type(decoder).__name__}; set compile='off'")


def compile_layers(decoder, backend: str) -> list:
    """torch.compile'd wrappers of each decoder layer (compiled lazily, dynamic shapes). Compiling block by
    block instead of the whole decoder lets every layer reuse the first one's compiled code (parameters are
    graph inputs); what that saves: docs/GPU.md, "Compiled training passes"."""
    return [torch.compile(layer, backend=backend, dynamic=True) for layer in decoder_layer_list(decoder)]


def _needs_grad(module, inputs, output):
    # with frozen embeddings the first layer's input needs no gradient and every other layer's does: torch.compile
    # would build that layer a graph of its own; asking for it (one [tokens, hidden] gradient) keeps one graph
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
        return output.requires_grad_()
    return output


@contextmanager
def swapped_layers(decoder, replacements: list):
    """Inside: the decoder runs `replacements` (the compiled wrappers, same weights) in place of its layers."""
    mods = decoder_layer_list(decoder)
    original = list(mods)
    for i, m in enumerate(replacements):
        mods[i] = m
    embed = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else None
    hook = embed.register_forward_hook(_needs_grad) if embed is not None else None
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()
        for i, m in enumerate(original):
            mods[i] = m


class CompiledGradientsMissing(RuntimeError):
    """The compiled training passes left a trainable tensor without a gradient (`_check_every_tensor_got_...`)."""


def compile_failure(e: BaseException) -> bool:
    """An error of torch.compile itself (tracing, a backend that cannot compile: no C++ compiler, no working
    Triton, a GPU too old for it) or a compiled graph that lost a gradient, as opposed to the math failing."""
    from torch._dynamo.exc import TorchDynamoException   # loaded already where anything was compiled
    return isinstance(e, (CompiledGradientsMissing, TorchDynamoException))


def packs_rows(wanted: bool, decoder, longest: int, device: torch.device, compiled: bool) -> bool:
    """Whether passes that share no prompt prefix run the rows packed into one sequence (`pack_rows`): only for
    decoders known to allow it, and on CUDA or compiled only where one kernel does it (the row-by-row fallback
    launches a kernel per row and reads the row starts to the host, which a graph cannot)."""
    from ...attention import packing_supported, varlen_available
    return wanted and packing_supported(decoder.config, longest) and (
        varlen_available(device, decoder.get_input_embeddings().weight.dtype)
        if compiled or device.type == "cuda" else True)


def row_layout(pack: bool, tree: bool, decoder, longest: int, device: torch.device, compiled: bool) -> bool | str:
    """How a trainer lays out its forward passes' rows (forward_response's `pack`): "tree" (the prompt tree,
    engine/tree.py) on the CPU, uncompiled, for decoders that take packed attention, where `tree_rows` is on: a
    CPU pass costs what its tokens cost. Else `packs_rows` (True: packed rows, False: padded); GPUs keep the
    shared-prefix and flash-kernel layouts, whose one kernel a block-by-block loop would not beat."""
    from ...attention import packing_supported
    if tree and torch.device(device).type == "cpu" and not compiled and packing_supported(decoder.config, longest):
        return "tree"
    return packs_rows(pack, decoder, longest, device, compiled)
