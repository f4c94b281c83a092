"""GPU check of components.models.load_model's every branch: a plain base (quantization None and "none"),
8-bit and 4-bit through bitsandbytes. No hub, no network: a small random Llama and a word-level tokenizer
are written to a folder first, then loaded the way the studio loads a local model.

Per variant it checks that every weight is on the GPU, that the 4/8-bit variants hold bitsandbytes layers,
and that a short greedy generation runs; it prints one line each and exits 1 if any check failed.

    python bench/gpu_quant_load.py                      # on a CUDA GPU (needs bitsandbytes for 4/8-bit)
    python bench/gpu_quant_load.py --device cpu         # CPU smoke test: plain loads; 4/8-bit must be refused
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_studio.components.fastgen import quantized_base  # noqa: E402
from rlhf_studio.components.models import ModelLoadError, load_model  # noqa: E402


def write_model(folder: Path) -> None:
    """A random 4-layer Llama (hidden 256) and a word-level tokenizer with distinct pad and eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(509)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(words), pad_token_id=0, eos_token_id=1, bos_token_id=1)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)


def check(folder: Path, device: str, quant) -> bool:
    try:
        lm = load_model(str(folder), device=device, quantization=quant)
    except ModelLoadError as e:
        refused = device == "cpu" and quant in ("4bit", "8bit") and "needs a CUDA GPU" in str(e)
        print(f"{str(quant):>5}: {'refused as expected' if refused else 'FAILED'}: {e}")
        return refused
    where = {p.device.type for p in lm.model.parameters()}
    bnb = quantized_base(lm.model)
    ids = lm.tokenizer("w1 w2 w3", return_tensors="pt").input_ids.to(lm.device)
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    want_bnb = quant in ("4bit", "8bit")
    ok = where == {torch.device(device).type} and bnb == want_bnb and out.shape[1] == ids.shape[1] + 4 \
        and lm.quantization == (quant if want_bnb else None)
    peak = f", {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB peak" if torch.cuda.is_available() else ""
    print(f"{str(quant):>5}: {'ok' if ok else 'FAILED'}: weights on {sorted(where)}, bitsandbytes layers {bnb}, "
          f"dtype {lm.dtype}, generated {out.shape[1] - ids.shape[1]} tokens{peak}")
    del lm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        write_model(Path(d))
        results = [check(Path(d), args.device, q) for q in (None, "none", "8bit", "4bit")]
    print("all checks passed" if all(results) else "SOME CHECKS FAILED")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
