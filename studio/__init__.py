"""RLHF Studio: generate, give feedback, retrain a reward model live, fine-tune with LoRA PPO."""
from .errors import StudioError
from .facade import Completion, Studio

__all__ = ["Studio", "StudioError", "Completion"]
