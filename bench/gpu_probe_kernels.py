"""Ceilings for the 1.7B shape's PPO micro-batch on this GPU: the matrix products of one decoder layer and of the
output head, and attention forward + backward through each SDPA backend, with the left-padding mask the trainer
builds and without a mask (causal, as a right-padded layout would allow).

    python bench/gpu_probe_kernels.py            # on a GPU, ~20 s

The training phase's time over the sum of these says how much of it is not matrix products or attention.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F


def timed(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--width", type=int, default=191)
    args = ap.parse_args(argv)
    dev, dt = "cuda", torch.bfloat16
    B, L, H, nh, hd, inter, V = args.rows, args.width, 2048, 32, 64, 8192, 49152
    M = B * L
    print(f"{torch.cuda.get_device_name()}: micro-batch {B} x {L} = {M} tokens")
    total = 0.0
    print("| product | shape | ms | TFLOP/s |")
    print("|---|---|---|---|")
    layer = [("q,k,v,o (x4)", H, H, 4), ("gate,up (x2)", H, inter, 2), ("down", inter, H, 1)]
    for name, k, n, times in layer:
        x = torch.randn(M, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5
        g = torch.randn(M, n, device=dev, dtype=dt)
        fwd = timed(lambda: x @ w.t())
        bwd = timed(lambda: g @ w)
        fl = 2 * M * k * n
        print(f"| {name} fwd | {M}x{k} @ {k}x{n} | {fwd:.3f} | {fl / fwd / 1e9:.0f} |")
        print(f"| {name} grad input | {M}x{n} @ {n}x{k} | {bwd:.3f} | {fl / bwd / 1e9:.0f} |")
        total += times * (fwd + bwd)
    per_layer = total
    R = 128
    x = torch.randn(B * R, H, device=dev, dtype=dt)
    w = torch.randn(V, H, device=dev, dtype=dt) / H ** 0.5
    g = torch.randn(B * R, V, device=dev, dtype=dt)
    head = timed(lambda: x @ w.t()) + timed(lambda: g @ w)
    print(f"| output head fwd + grad input | {B * R}x{H} @ {H}x{V} | {head:.3f} | "
          f"{2 * 2 * B * R * H * V / head / 1e9:.0f} |")

    # attention: left padding as the trainer lays rows out (prompts of 16..64 tokens, 128 response tokens)
    q, k, v = (torch.randn(B, nh, L, hd, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    go = torch.randn(B, nh, L, hd, device=dev, dtype=dt)
    pad = torch.randint(0, 48, (B,), device=dev)
    cols = torch.arange(L, device=dev)
    keep = cols.unsqueeze(0) >= pad.unsqueeze(1)                                   # [B, L]
    causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
    mask = (causal.unsqueeze(0) & keep.unsqueeze(1)).unsqueeze(1)                  # [B, 1, L, L]
    mask |= ~keep.unsqueeze(1).unsqueeze(-1)     # pad queries see everything: no fully masked row
    from torch.nn.attention import SDPBackend, sdpa_kernel
    print("\n| attention fwd + bwd, 1 layer | ms |")
    print("|---|---|")
    attn = {}
    for label, backend, m, is_causal in [
            ("efficient, left-pad mask (today)", SDPBackend.EFFICIENT_ATTENTION, mask, False),
            ("cuDNN, left-pad mask", SDPBackend.CUDNN_ATTENTION, mask, False),
            ("efficient, causal, no mask", SDPBackend.EFFICIENT_ATTENTION, None, True),
            ("flash, causal, no mask", SDPBackend.FLASH_ATTENTION, None, True),
            ("cuDNN, causal, no mask", SDPBackend.CUDNN_ATTENTION, None, True)]:
        def run():
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=is_causal)
            o.backward(go)
        try:
            ms = timed(run)
            attn[label] = ms
            print(f"| {label} | {ms:.3f} |")
        except Exception as e:   # a backend that does not take these inputs
            print(f"| {label} | n/a ({type(e).__name__}: {str(e)[:80]}) |")
    today = attn.get("efficient, left-pad mask (today)", 0.0)
    layers = 24
    print(f"\nper micro-batch, 24 layers: products {layers * per_layer:.1f} ms + head {head:.1f} ms + attention "
          f"{layers * today:.1f} ms (today's kernel) = {layers * (per_layer + today) + head:.1f} ms; best attention "
          f"{layers * min(attn.values()):.1f} ms" if attn else "")


if __name__ == "__main__":
    main()
