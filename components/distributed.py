"""Data-parallel LoRA training with Ray Train's torch integration (TorchTrainer + DDP; gloo on CPU, nccl on GPU).

Every worker builds the same model, trains on its own shard of the global batch, and DDP averages the LoRA
gradients across workers before the optimiser step: with equal shards, the averaged gradient is the gradient of
the global batch's mean loss, so N workers take the same step as one worker on the whole batch."""
from __future__ import annotations

import math
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


# ------------------------------------------------------------------------------------------------------------
# Data parallel for the studio's own trainers (PPO, RLOO, GRPO, DPO, KTO), from outside the trainer
# ------------------------------------------------------------------------------------------------------------
# The trainers run their own backward passes, clipping and optimiser steps; they are not wrapped in DDP. Instead
# every trainable parameter gets a hook that, once each backward pass has accumulated its gradients, averages
# them over the workers (one all-reduce of all of them), so the clip and the step that follow see the global
# batch's gradient on every worker. Workers start from the same weights (broadcast from rank 0) and apply the
# same update, so they stay equal without any further exchange.

# the settings that make up a step's global batch, per algorithm: the first is what a step draws (prompts or
# rows), the last what one optimiser step takes, which `grad_accum` splits into micro-batches
GLOBAL_BATCH = {"ppo": ("batch_size", "mini_batch_size"), "rloo": ("prompts_per_step", "mini_batch_size"),
                "grpo": ("prompts_per_step", "mini_batch_size"), "dpo": ("batch_size",), "kto": ("batch_size",)}


def split_config(algorithm: str, config: dict, world: int) -> dict:
    """One worker's config when the global batch of `config` is split evenly over `world` workers; a ValueError
    that names the setting where it does not split."""
    keys = GLOBAL_BATCH[algorithm]
    out = dict(config)
    for k in keys:
        if out[k] % world:
            raise ValueError(f"{k} ({out[k]}) must be a multiple of the {world} workers: each worker takes an equal "
                             "share of the global batch")
        out[k] //= world
    if "grad_accum" in out:
        # micro-batches only save memory (each one's loss is divided by grad_accum): as many as divide the share
        out["grad_accum"] = math.gcd(out[keys[-1]], int(out["grad_accum"]))
    return out


def trainable_parameters(trainer) -> list[torch.nn.Parameter]:
    """What the trainer's optimiser steps (the LoRA tensors, and PPO's value head), in the optimiser's order."""
    return [p for g in trainer.optimizer.param_groups for p in g["params"]]


def broadcast_parameters(params: list[torch.Tensor]) -> None:
    """Every worker takes rank 0's values (as DDP does at start): the same start whatever each one drew."""
    import torch.distributed as dist
    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    dist.broadcast(flat, src=0)
    with torch.no_grad():
        for p, v in zip(params, flat.split([p.numel() for p in params])):
            p.copy_(v.view_as(p))


def average_gradients(params: list[torch.Tensor], world: int) -> None:
    """Each gradient replaced by its mean over the workers, in one all-reduce. A tensor without a gradient on a
    worker counts as zero there (its rows did not reach it); one without a gradient anywhere keeps none."""
    import torch.distributed as dist
    has = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
                     + [has])
    dist.all_reduce(flat)             # gloo has no AVG: sum, then divide
    sizes = [p.numel() for p in params]
    grads = flat[:sum(sizes)].div_(world).split(sizes)
    for p, g, n in zip(params, grads, flat[sum(sizes):].tolist()):
        if n > 0:
            g = g.view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)


class GradientAverager:
    """Averages `params`' gradients over the workers at the end of every backward pass (`average_gradients`).

    A hook on each parameter (`register_post_accumulate_grad_hook`) queues one callback that the autograd engine
    runs when the whole backward pass is done: every worker then all-reduces all tensors in the same order,
    whatever order its own graph produced them in. With gradient accumulation this runs after each micro-batch
    on the gradient accumulated so far; the part accumulated before is already equal on every worker, and the
    mean of equal values is that value, so the result is the same as one average after the last micro-batch."""

    def __init__(self, params: list[torch.Tensor], world: int):
        self.params, self.world = list(params), world
        self.syncs = 0                     # backward passes averaged so far
        self._queued = False
        self._handles = [p.register_post_accumulate_grad_hook(self._ready) for p in self.params]

    def _ready(self, _param) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._average)

    def _average(self) -> None:
        self._queued = False
        average_gradients(self.params, self.world)
        self.syncs += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def mean_metrics(metrics: dict, world: int) -> dict:
    """A step's metrics averaged over the workers (a rate ending in `_per_s` summed: the global throughput); the
    rest (sample rollouts) stays this worker's. Whole numbers equal on every worker (the step) stay whole."""
    import torch.distributed as dist
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    every: list = [None] * world
    dist.all_gather_object(every, numeric)
    out = dict(metrics)
    for k, v in numeric.items():
        values = [m[k] for m in every if k in m]
        if isinstance(v, int) and all(x == v for x in values):
            continue
        out[k] = float(sum(values)) if k.endswith("_per_s") else float(sum(values)) / len(values)
    return out


class SharedStop:
    """Rank 0's answer to "stop now?" (the app's cancel), shared: every worker asks at the same point of each
    step, so all leave the training loop after the same step."""

    def __init__(self, local, device):
        self.local, self.device = local, device     # local: rank 0's cancel flag; None on the other ranks
        self.stopped = False

    def is_set(self) -> bool:
        import torch.distributed as dist
        flag = torch.tensor([float(bool(self.local is not None and self.local.is_set()))], device=self.device)
        dist.broadcast(flag, src=0)
        self.stopped = bool(flag.item())
        return self.stopped

    def announce(self) -> None:
        """Rank 0 left the loop on its own (the reward-hacking watch paused the run): answer the others' question."""
        import torch.distributed as dist
        dist.broadcast(torch.ones(1, device=self.device), src=0)
        self.stopped = True


def make_data_parallel(trainer, rank: int, world: int) -> GradientAverager:
    """Turn a studio trainer built on every worker into one data-parallel trainer, from outside: rank 0's
    weights everywhere, gradients averaged before the clip, metrics averaged; an offline trainer (a `next_rows`
    sampler over the whole data, the same order on every worker) gives each worker its share of each step's
    rows, so the workers together take the rows one worker would. Online trainers get their share of the
    prompts when built (`rlhf_studio.studio.cluster`), and each worker but rank 0 a sampling seed of its own."""
    params = trainable_parameters(trainer)
    broadcast_parameters(params)
    averager = GradientAverager(params, world)
    trainer.gradient_averager = averager            # kept with the trainer (its hooks live as long)
    if callable(getattr(trainer, "next_rows", None)):
        whole = trainer.next_rows

        def next_rows(n: int) -> list:
            return whole(n * world)[rank * n:(rank + 1) * n]
        trainer.next_rows = next_rows
    if rank:     # sampling: a stream of its own on each worker (rank 0 keeps the one its checkpoints carry)
        torch.manual_seed((int(trainer.config.seed) + 7919 * rank + trainer.step_count) % 2**63)
    step = trainer.step
    trainer.step = lambda: mean_metrics(step(), world)
    return averager
