"""Where does a NaN in a CUDA PPO step come from? One step on random weights with NaN counts at each stage.

    python bench/gpu_nan_probe.py [--shape 135m] [--batch 64] [--new-tokens 128]
Prints, per stage, the NaN count (and, for hidden states, at masked vs real positions), then the same step with
each SDPA backend switched off in turn. A debugging probe, not a benchmark.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu_ppo as g  # noqa: E402
import components.ppo.trainer as T  # noqa: E402
from components.ppo import PPOConfig, PPOTrainer  # noqa: E402


def nan(x):
    return int(torch.isnan(x).sum()) if x is not None else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="135m")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    folder = Path(tempfile.mkdtemp())
    g.save_random_model(a.shape, folder, 3.0)
    lm = g.load(folder, "none", dev, dtype)
    prompts = g.random_prompts(a.batch, lm.model.config.vocab_size, seed=0)
    reward = g.SyntheticReward(lm.model.get_output_embeddings().weight.detach(), lm.model.config.hidden_size)

    orig_fr = T.forward_response

    def fr(model, q, qm, r, rm, *args, **kw):
        out = orig_fr(model, q, qm, r, rm, *args, **kw)
        msg = f"   forward_response(want_hidden={kw.get('want_hidden', False)}, grad={torch.is_grad_enabled()}): " \
              f"logp {nan(out.logp)} values {nan(out.values)} entropy {nan(out.entropy)}"
        if out.hidden is not None:
            real = torch.cat([qm, rm], 1).bool()
            hn = torch.isnan(out.hidden).any(-1)
            msg += f" hidden rows NaN: real {int((hn & real).sum())} masked {int((hn & ~real).sum())} of {int((~real).sum())}"
        print(msg, f"| r ids {int(r.min())}..{int(r.max())}", flush=True)
        return out
    T.forward_response = fr

    def run(label):
        cfg = PPOConfig(steps=2, batch_size=a.batch, mini_batch_size=a.batch, grad_accum=1, ppo_epochs=2,
                        max_new_tokens=a.new_tokens, max_prompt_tokens=64, temperature=1.0, lr=1e-5, kl_coef=0.01,
                        missing_eos_penalty=0.0, lora_r=16, lora_alpha=32, seed=0, value_head_init="zeros")
        tr = PPOTrainer(lm, reward, cfg, prompts, device=dev)
        orig_score = tr._score

        def score(ro, bh):
            raw, s = orig_score(ro, bh)
            print(f"   score: raw NaN {nan(raw)} scores NaN {nan(s)}", flush=True)
            return raw, s
        tr._score = score
        print(f"== {label}", flush=True)
        try:
            m = tr.step()
            print(f"   ok: policy_loss {m['policy_loss']:.4f} approx_kl {m['approx_kl']:.4g} kl {m['kl']:.4g}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"   FAILED {type(e).__name__}: {e}", flush=True)
        del tr

    run("default")
    if dev.type == "cuda":
        q = torch.randn(2, 4, 8, 64, device=dev, dtype=dtype)
        m = torch.ones(2, 1, 8, 8, dtype=torch.bool, device=dev).tril()
        m[0, :, :3] = False                                   # three fully masked query rows
        for name in ("flash", "efficient", "cudnn", "math"):
            try:
                from torch.nn.attention import SDPBackend, sdpa_kernel
                be = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                      "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
                with sdpa_kernel([be]):
                    o = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=m)
                print(f"   sdpa {name}: NaN in fully masked rows {nan(o[0, :, :3])}, elsewhere {nan(o[1])}")
            except Exception as e:  # noqa: BLE001
                print(f"   sdpa {name}: {type(e).__name__}: {str(e)[:80]}")
        torch.backends.cuda.enable_cudnn_sdp(False)
        run("cuDNN attention off")
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        run("cuDNN and mem-efficient attention off")


if __name__ == "__main__":
    main()
