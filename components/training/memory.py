"""Peak-memory estimate of a PPO run, so the UI can refuse a run that cannot fit before loading anything.

The estimate is deliberately simple and errs high: weights + LoRA training state + the largest of the three
phases (generation with its KV cache, the no-grad scoring passes, one training micro-batch with its saved
activations and full-vocabulary logits) + a fixed runtime overhead, times a fragmentation factor.
"""
from __future__ import annotations

import torch

from .ppo_config import PPOConfig

_DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
GIB = 1024 ** 3


def _get(cfg, *names, default=None):
    for n in names:
        v = cfg.get(n) if isinstance(cfg, dict) else getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _dtype_bytes(dtype) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    if dtype in (None, "", "auto"):
        return 2
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}")
    return _DTYPE_BYTES[dtype]


def model_shape(model_config) -> dict:
    """The numbers of a llama-like decoder config (PretrainedConfig or dict) that the estimate needs."""
    if hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()
    H = int(_get(model_config, "hidden_size", "n_embd"))
    L = int(_get(model_config, "num_hidden_layers", "n_layer"))
    nh = int(_get(model_config, "num_attention_heads", "n_head"))
    nkv = int(_get(model_config, "num_key_value_heads", default=nh))
    hd = int(_get(model_config, "head_dim", default=H // nh))
    inter = int(_get(model_config, "intermediate_size", default=4 * H))
    V = int(_get(model_config, "vocab_size"))
    tied = bool(_get(model_config, "tie_word_embeddings", default=True))
    return dict(H=H, L=L, nh=nh, nkv=nkv, hd=hd, I=inter, V=V, tied=tied)


def linear_shapes(s: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of the linear layers of one decoder layer."""
    H, nh, nkv, hd, inter = s["H"], s["nh"], s["nkv"], s["hd"], s["I"]
    return {"q_proj": (H, nh * hd), "k_proj": (H, nkv * hd), "v_proj": (H, nkv * hd), "o_proj": (nh * hd, H),
            "gate_proj": (H, inter), "up_proj": (H, inter), "down_proj": (inter, H)}


def available_bytes(device: str) -> int | None:
    """Memory free for a new process now: CUDA free memory, or the OS's MemAvailable on the CPU; None if unknown."""
    try:
        if device == "cuda":
            if not torch.cuda.is_available():
                return None
            return int(torch.cuda.mem_get_info()[0])
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except Exception:
        return None
    return None


def estimate_memory(model_config, config: PPOConfig, quantization: str | None = None, dtype="bf16",
                    device: str | None = None) -> dict:
    """Estimated peak bytes of PPO training on one device.

    model_config: the model's transformers config (or a dict with the same keys); config: the PPOConfig;
    quantization: None, "8bit" or "4bit" (linear layers only; embeddings, norms and the output head stay in
    `dtype`); dtype: compute dtype ("bf16", "fp32", ... or a torch.dtype). Sequences are assumed at their
    limits (max_prompt_tokens + max_new_tokens). device: "cuda" or "cpu" (default: cuda when available).
    Returns {"bytes": int, "gib": float, "breakdown": {name: bytes}, "params": int, "trainable_params": int,
    "device": str, "available_bytes": int | None (free now on that device)}.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device).split(":")[0]
    s = model_shape(model_config)
    act = _dtype_bytes(dtype)
    H, L, V, nkv, hd = s["H"], s["L"], s["V"], s["nkv"], s["hd"]
    shapes = linear_shapes(s)
    quantized = quantization not in (None, "", "none")

    # ---- weights ------------------------------------------------------------------------------------------
    linear_params = L * sum(i * o for i, o in shapes.values())
    other_params = V * H * (1 if s["tied"] else 2) + L * 2 * H + H
    qbytes = {None: act, "": act, "none": act, "8bit": 1.0, "4bit": 0.5 + 0.0625}[quantization]
    weights = linear_params * qbytes + other_params * act

    # ---- LoRA + value head: fp32 weights, grads and two AdamW moments --------------------------------------
    tm = config.target_modules
    targets = list(shapes) if tm == "all-linear" else [t for t in ([tm] if isinstance(tm, str) else tm)
                                                       if t in shapes]
    lora_params = L * sum(config.lora_r * (shapes[t][0] + shapes[t][1]) for t in targets)
    trainable = lora_params + H + 1
    train_state = trainable * 4 * 4

    # ---- generation: KV cache + one step of logits (fp32 for sampling) ----------------------------------------
    B = config.batch_size
    T = config.max_prompt_tokens + config.max_new_tokens
    R = config.max_new_tokens
    kv_cache = 2 * L * nkv * hd * B * T * act
    gen = kv_cache + B * V * 4 * 3 + B * T * H * act * 4
    # sampling with the LoRA merged (PPOTrainer.merge_for_generation) keeps a copy of the adapted base weights
    if config.merges_for_sampling(quantized, act == 4, device):
        gen += L * sum(shapes[t][0] * shapes[t][1] for t in targets) * act

    # ---- scoring passes (no grad): response logits (+fp32 copy, softmax for entropy) + base hidden ------------
    score = B * R * V * (act + 4 + 4) + B * T * H * act * 6 + B * T * s["I"] * act * 2

    # ---- one training micro-batch: saved activations + logits and their gradients ----------------------------
    m = config.mini_batch_size // config.grad_accum
    per_tok_layer = (6 * H + 4 * s["I"] + 2 * s["nh"] * hd + 2 * nkv * hd + 2 * len(targets) * config.lora_r) * act
    if act < 4:
        # both RMSNorms of a layer compute in fp32 and autograd keeps that fp32 copy of their input
        per_tok_layer += 2 * 4 * H
        # peft keeps the adapters in fp32 on a half-precision (or quantized) base and casts each LoRA layer's
        # input to fp32, which autograd saves: 4 bytes per input feature of every target, per token and layer.
        # The fused forward (components/fused_lora.py; not on a quantized base) keeps the half input instead.
        if not (config.fused_lora and not quantized):
            per_tok_layer += 4 * sum(shapes[t][0] for t in targets)
    if config.gradient_checkpointing:
        acts = m * T * (L * H * act + per_tok_layer)
    else:
        acts = m * T * L * per_tok_layer
    logits = m * R * V * (act + 4 + 4 + 4)
    train = acts + logits + m * T * H * act * 4

    # ---- runtime ----------------------------------------------------------------------------------------------
    overhead = (0.6 * GIB if device == "cuda" else 0.3 * GIB)
    if quantization in ("8bit", "4bit"):
        overhead += 0.2 * GIB   # dequantisation buffers
    peak_phase = max(gen, score, train)
    total = (weights + train_state + peak_phase) * 1.15 + overhead
    breakdown = {"weights": int(weights), "lora_and_optimizer": int(train_state), "generation": int(gen),
                 "scoring": int(score), "training": int(train), "runtime_overhead": int(overhead)}
    return {"bytes": int(total), "gib": round(total / GIB, 2), "breakdown": breakdown,
            "params": int(linear_params + other_params), "trainable_params": int(trainable),
            "device": device, "available_bytes": available_bytes(device)}
