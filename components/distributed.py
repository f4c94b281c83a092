"""Data-parallel LoRA training with Ray Train's torch integration (TorchTrainer + DDP; gloo on CPU, nccl on GPU).

Every worker builds the same model, trains on its own shard of the global batch, and DDP averages the LoRA
gradients across workers before the optimiser step: with equal shards, the averaged gradient is the gradient of
the global batch's mean loss, so N workers take the same step as one worker on the whole batch."""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch


def tiny_llama(seed: int = 0, vocab: int = 128, hidden: int = 64, layers: int = 2):
    """A random-weight Llama of `layers` layers (the same on every worker for the same seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()        # eval: no dropout, the step is deterministic


def with_lora(model, r: int = 4, seed: int = 1):
    """LoRA on q/v with both factors random (the default B = 0 would leave A's gradient zero in a first step)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj"]))


def lora_state(model) -> dict[str, torch.Tensor]:
    model = getattr(model, "module", model)          # unwrap DDP
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}


def fixed_batch(size: int, seq_len: int, vocab: int = 128, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (size, seq_len), generator=g)


def shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    if batch.shape[0] % world:
        raise ValueError(f"a global batch of {batch.shape[0]} does not split evenly over {world} workers")
    per = batch.shape[0] // world
    return batch[rank * per:(rank + 1) * per]


def train_steps(model, optimizer, tokens: torch.Tensor, steps: int) -> list[float]:
    """`steps` steps of next-token loss on `tokens` (no padding: every row has as many tokens, so the mean of
    the workers' mean losses is the global mean). Returns each step's local loss."""
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()                   # under DDP: the gradients are all-reduced (averaged) here
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _train_loop_per_worker(config: dict) -> None:
    """Runs on each Ray Train worker, inside the torch process group that TorchTrainer set up."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    torch.set_num_threads(int(config.get("threads", 1)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = with_lora(tiny_llama(config["seed"], layers=config["layers"], hidden=config["hidden"]))
    model = ray.train.torch.prepare_model(model)       # DDP (parameters broadcast from rank 0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config["lr"])
    tokens = shard(fixed_batch(config["batch"], config["seq_len"]), rank, world)
    t0 = time.perf_counter()
    losses = train_steps(model, opt, tokens, config["steps"])
    seconds = time.perf_counter() - t0
    mean = torch.tensor(losses)
    dist.all_reduce(mean)                 # gloo has no AVG: sum, then divide
    metrics = {"losses": (mean / world).tolist(), "seconds": seconds, "world": world}
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            torch.save(lora_state(model), os.path.join(d, "lora.pt"))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


def train_data_parallel(num_workers: int, *, batch: int = 4, seq_len: int = 16, steps: int = 1, lr: float = 0.5,
                        seed: int = 0, layers: int = 2, hidden: int = 64, use_gpu: bool = False,
                        storage_path: str | None = None) -> dict:
    """Train the tiny LoRA model on `num_workers` Ray Train workers; returns {"losses", "seconds", "lora"}
    (rank 0's LoRA weights after training). Needs a running Ray runtime (ray.init)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    storage = storage_path or tempfile.mkdtemp(prefix="rlhf-studio-raytrain-")
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config=dict(batch=batch, seq_len=seq_len, steps=steps, lr=lr, seed=seed, layers=layers,
                               hidden=hidden, threads=int(os.environ.get("RLHF_STUDIO_TRAIN_THREADS") or 1)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(storage_path=storage, name=f"dp-{num_workers}w-{time.time_ns()}"),
    )
    try:
        result = trainer.fit()
        with result.checkpoint.as_directory() as d:
            lora = torch.load(os.path.join(d, "lora.pt"))
    finally:
        if storage_path is None:
            shutil.rmtree(storage, ignore_errors=True)
    return {"losses": result.metrics["losses"], "seconds": result.metrics["seconds"], "lora": lora}
