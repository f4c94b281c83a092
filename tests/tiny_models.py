"""Tiny random-weight causal LMs of the architectures users bring, each with its family's chat template, for
tests of what must work on any causal LM. The tokenizer is the embedded SmolLM2 one (its special tokens are
SmolLM2's; the templates' own markers are plain text to it), the vocabulary sized to match."""
from __future__ import annotations

from pathlib import Path

LLAMA3 = ("{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023"
          "<|eot_id|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML_SYSTEM = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Qwen, a helpful assistant."
                 "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
         "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
PHI3 = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# no system prompt and nothing before the user's words: rows share no prefix
BARE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }} [/INST]{% else %}{{ m['content'] }}"
        "{{ eos_token }}{% endif %}{% endfor %}")

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=256)


def _configs(vocab: int) -> dict:
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config,
                              Qwen2Config, Qwen3Config)
    common = dict(SMALL, vocab_size=vocab, tie_word_embeddings=True)
    return {
        "llama": (LlamaConfig(**common), LLAMA3),
        "qwen2": (Qwen2Config(**common), CHATML_SYSTEM),
        "qwen3": (Qwen3Config(**common), CHATML),
        "gemma2": (Gemma2Config(**common, query_pre_attn_scalar=8), GEMMA),
        "gemma3_text": (Gemma3TextConfig(**common, sliding_window=16, query_pre_attn_scalar=8), GEMMA),
        "mistral": (MistralConfig(**common, sliding_window=None), BARE),
        "phi3": (Phi3Config(**{k: v for k, v in common.items() if k != "head_dim"}, pad_token_id=None), PHI3),
        "llama_no_template": (LlamaConfig(**common), None),
    }


ARCHITECTURES = ["llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "mistral", "phi3", "llama_no_template"]


def write_tiny_model(name: str, folder: Path, tokenizer_dir: str, seed: int = 0) -> Path:
    """Save architecture `name` (random weights, seeded) with the embedded tokenizer and its chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg, template = _configs(len(tok))[name]
    cfg.eos_token_id, cfg.bos_token_id = tok.eos_token_id, tok.bos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():        # larger than the default init, so that the layers matter to the outputs
        for n, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    tok.chat_template = template
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
