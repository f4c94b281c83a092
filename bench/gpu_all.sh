#!/bin/bash
# Every GPU check and benchmark of issues 4 and 7 in one go (one device session). Results go to $OUT.
# Needs, beside the image's torch/transformers/peft: bitsandbytes, trl 1.12.0, datasets 5.2.0, dill, multiprocess
# (carried as wheels in .whl/), and the TRL peer harness copied to .gpu/peers/ (from ../shared/peers/gpu).
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"

echo "== 1. rollout generation and LoRA training step vs baselines (issue 7)"
timeout 210 python3 bench/gpu_fast.py 2>&1 | tee "$OUT/gpu_fast.log" | grep -vE "Warning|warn" | tail -45

echo "== 2. end-to-end PPO vs TRL 1.12.0, 135M shape, 64 prompts x 128 tokens, 4 epochs (issue 7)"
(cd .gpu/peers && timeout 110 python3 trl_ppo_gpu.py --random-init cfg135m --tokenizer tok --cuda --batch 64 \
    --new-tokens 128 --steps 3 --warmup 1 --epochs 4 --json "$OUT/trl_135m_b64_t128.json" 2>&1 \
    | grep -E "RESULT|Error" | cut -c1-700)
timeout 110 python3 bench/gpu_ppo.py --shapes 135m --quant none --batch 64 --mini-batch 64 --epochs 4 \
    --new-tokens 128 --steps 4 --max-seconds 80 --json "$OUT/ours_135m_b64_t128.json" 2>&1 | tail -8

echo "== 3. short PPO on CUDA: bf16 / 8-bit / 4-bit x 135M / 0.5B / 1.7B (issue 4)"
timeout 200 python3 bench/gpu_ppo.py --steps 6 --max-seconds 18 --json "$OUT/gpu_ppo.json" 2>&1 | tail -25
