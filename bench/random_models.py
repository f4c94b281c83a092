"""Random-weight causal LMs of the shapes the GPU benchmarks train, and a synthetic reward PPO can move on them.

No hub, no network: the models are built from hand-written configs (SmolLM2-135M, a Qwen2.5-0.5B-like and a
SmolLM2-1.7B-like shape) with random weights; the 8/4-bit variants are the same random weights saved once and
reloaded through transformers' BitsAndBytesConfig (the path `components.models.load_model` uses).

Random weights give a near-uniform next-token distribution that PPO can hardly move in a few steps, so the
final norm's weight is scaled so that the random logits have a standard deviation of `logit_std` (peaked like
a trained LM's); the residual stream and the layers are left as initialised. Used by bench/bench_ppo.py
(--device cuda) and tests/gpu.
"""
from __future__ import annotations

import math
import shutil
import tempfile
import threading
from pathlib import Path

import torch

SHAPES = {
    "tiny": dict(kind="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=49152,
                 max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True),
    "135m": dict(kind="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
    "0.5b": dict(kind="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, head_dim=64, vocab_size=151936,
                 max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True),
    "1.7b": dict(kind="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                 num_attention_heads=32, num_key_value_heads=32, head_dim=64, vocab_size=49152,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=130000.0, tie_word_embeddings=True),
}
EOS, PAD, BOS = 2, 0, 1


def build_config(name: str):
    from transformers import LlamaConfig, Qwen2Config
    s = dict(SHAPES[name])
    kind = s.pop("kind")
    theta = s.pop("rope_theta")
    common = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, attention_dropout=0.0,
                  rope_parameters={"rope_type": "default", "rope_theta": theta}, use_cache=True)
    if kind == "qwen2":
        return Qwen2Config(**s, **common)
    return LlamaConfig(**s, attention_bias=False, mlp_bias=False, **common)


class IdTokenizer:
    """Stand-in tokenizer for random weights: prompts are token-id lists, decode prints ids."""
    eos_token_id, pad_token_id, bos_token_id = EOS, PAD, BOS
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i in (EOS, PAD, BOS)))


def save_random_model(name: str, folder: Path, logit_std: float, seed: int = 0) -> None:
    """Random weights of shape `name`, final norm scaled so the logits have std ~logit_std, saved in bf16."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = build_config(name)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        # logits = norm(x) . e with |norm(x)| ~ sqrt(H) * w and e ~ N(0, std_e^2): std ~ w * sqrt(H) * std_e
        std_e = float(m.get_output_embeddings().weight.float().std())
        m.get_decoder().norm.weight.fill_(logit_std / (std_e * cfg.hidden_size ** 0.5))
    m.save_pretrained(str(folder))
    del m


def load(folder: Path, quant: str, device: torch.device, dtype: torch.dtype):
    """A components.models.LoadedModel around the saved random model (quantized through bitsandbytes)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from rlhf_studio.components.models import LoadedModel
    kwargs = dict(dtype=dtype)
    if quant == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16,
                                                           bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": device.index or 0}
    elif quant == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    if quant == "none":
        model.to(device)
    model.eval()
    model.generation_config.pad_token_id = PAD
    return LoadedModel(model=model, tokenizer=IdTokenizer(), model_id=f"random:{folder.name}", revision="random",
                       device=device, dtype=dtype, quantization=None if quant == "none" else quant,
                       source_path=str(folder), lock=threading.RLock())


class SyntheticReward:
    """A dense synthetic reward that PPO can move on random weights, plus the base-hidden path of the app:

        score = 2 * mean over response tokens of s(token)  +  0.1 * random linear head on pooled base features

    s(token) = standardised projection of the token's output embedding on a random direction u: the policy
    raises it by turning its final hidden state towards u (every sampled token carries signal).
    """
    uses_base_hidden = True

    def __init__(self, output_embeddings: torch.Tensor, hidden_size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(output_embeddings.shape[1], generator=g).to(output_embeddings.device)
        s = output_embeddings.float() @ u
        self.token_score = ((s - s.mean()) / s.std()).detach()
        self.w = torch.randn(2 * hidden_size, generator=g) / math.sqrt(2 * hidden_size)

    @torch.no_grad()
    def __call__(self, *, model, input_ids, attention_mask, response_mask, base_hidden=None):
        from rlhf_studio.components.reward.features import pool_features
        ts = self.token_score.to(input_ids.device)[input_ids] * response_mask
        tok = ts.sum(1) / response_mask.sum(1).clamp(min=1)
        feats = pool_features(base_hidden, attention_mask, response_mask)
        feats = feats / feats.norm(dim=1, keepdim=True).clamp(min=1e-6)
        return 2.0 * tok + 0.1 * math.sqrt(feats.shape[1]) * (feats @ self.w.to(feats.device))


def random_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(16, 65, (1,), generator=g))
        out.append(torch.randint(3, vocab, (length,), generator=g).tolist())
    return out


def random_trainer(shape: str, device: torch.device, dtype: torch.dtype, n_prompts: int, logit_std: float = 3.0,
                   **config):
    """(trainer, prompts): a PPOTrainer on random weights of `shape` (loaded from a temporary folder), the
    synthetic reward, `n_prompts` random prompts and PPOConfig(**config). For the GPU scripts beside this one."""
    from rlhf_studio.components.training.ppo import PPOConfig, PPOTrainer
    folder = Path(tempfile.mkdtemp(prefix=f"ppo_{shape}_"))
    try:
        save_random_model(shape, folder, logit_std)
        lm = load(folder, "none", device, dtype)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    prompts = random_prompts(n_prompts, lm.model.config.vocab_size, seed=0)
    reward = SyntheticReward(lm.model.get_output_embeddings().weight.detach(), lm.model.config.hidden_size)
    return PPOTrainer(lm, reward, PPOConfig(**config), prompts, device=device), prompts
