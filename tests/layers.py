"""The embedded model cut to its first decoder layers, for tests of mechanics that hold layer by layer."""
from __future__ import annotations


def keep_first_layers(lm, n: int):
    """Keep only the first `n` decoder layers of a loaded model (real weights; embeddings, final norm and output
    head unchanged) and return it. For tests whose claims do not depend on depth (a checkpoint resumes
    identically, compiled passes equal eager ones, packed rows equal padded rows): each layer costs the same, and
    on a CPU six of SmolLM2's thirty cut a training step to about a third (the 49152-token output head stays)."""
    from rlhf_studio.components.model_utils import causal_lm_of
    decoder = causal_lm_of(lm.model).get_decoder()
    decoder.layers = decoder.layers[:n]
    lm.model.config.num_hidden_layers = n
    return lm
