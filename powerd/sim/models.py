"""LLM profiles for the simulated inference server.

Byte and FLOP figures follow from the parameter count and the attention shape (bf16 weights, so
2 bytes per parameter; a forward pass costs 2 FLOPs per parameter per token; the KV cache holds
a key and a value of `head_dim` bf16 numbers per KV head per layer per token).
"""

from __future__ import annotations

from dataclasses import dataclass

from powerd.wording import counted

BYTES_PER_PARAM_BF16 = 2
GIB = 1024**3


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """One LLM as the roofline sees it; byte and FLOP figures cover the whole model (all ranks)."""

    name: str
    """Served model name, as `--served-model-name` would report it."""
    n_params: float
    n_layers: int
    hidden_size: int
    n_kv_heads: int
    head_dim: int
    weight_bytes: float
    flops_per_token: float
    """Dense forward FLOPs per token, 2 per parameter."""
    kv_bytes_per_token: float
    """KV-cache bytes per token over all layers and KV heads."""
    attn_flops_per_token_per_ctx: float
    """Attention FLOPs per token per token of context attended (QK^T and AV)."""
    max_batch: int = 256
    """Most sequences in one iteration (vLLM `max_num_seqs`)."""
    max_model_len: int = 131072
    tp: int = 1
    """Default tensor-parallel degree."""

    def kv_capacity_tokens(self, memory_gb: float, tp: int, utilization: float = 0.9) -> int:
        """KV-cache tokens a TP group of `tp` GPUs with `memory_gb` GiB each can hold.

        Each rank gives `utilization` of its memory to the server (vLLM
        `gpu_memory_utilization`), keeps weight_bytes/tp for its weight shard and fills the rest
        with its 1/tp share of every token's KV entries. Raises ValueError when the weights do
        not fit.
        """
        if tp < 1:
            raise ValueError(f"tp must be at least 1, got {tp}")
        free_bytes = memory_gb * GIB * utilization - self.weight_bytes / tp
        if free_bytes <= 0:
            raise ValueError(
                f"{self.name} does not fit on {counted(tp, 'GPU')} of {memory_gb:g} GiB: weights "
                f"need {self.weight_bytes / tp / GIB:.1f} GiB per rank"
            )
        return int(free_bytes / (self.kv_bytes_per_token / tp))


def _llama(
    name: str,
    n_params: float,
    n_layers: int,
    hidden_size: int,
    n_kv_heads: int,
    head_dim: int,
    tp: int,
) -> ModelProfile:
    return ModelProfile(
        name=name,
        n_params=n_params,
        n_layers=n_layers,
        hidden_size=hidden_size,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        weight_bytes=n_params * BYTES_PER_PARAM_BF16,
        flops_per_token=2.0 * n_params,
        kv_bytes_per_token=2.0 * n_layers * n_kv_heads * head_dim * BYTES_PER_PARAM_BF16,
        attn_flops_per_token_per_ctx=4.0 * n_layers * hidden_size,
        tp=tp,
    )


# Shapes from the models' published config.json (num_hidden_layers, hidden_size,
# num_key_value_heads, head_dim = hidden_size / num_attention_heads).
_PROFILES: dict[str, ModelProfile] = {
    p.name: p
    for p in (
        _llama("llama-3.1-8b", 8.03e9, 32, 4096, 8, 128, tp=1),
        _llama("llama-3.1-70b", 70.6e9, 80, 8192, 8, 128, tp=4),
        _llama("llama-3.2-3b", 3.21e9, 28, 3072, 8, 128, tp=1),
    )
}

SERVED_MODEL_NAMES: dict[str, str] = {
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
}


def get_model_profile(name: str) -> ModelProfile:
    """The profile called `name`; ValueError naming the known ones otherwise."""
    try:
        return _PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown model profile {name!r}; known: {', '.join(sorted(_PROFILES))}"
        ) from None


def list_model_profiles() -> list[str]:
    """Names of the built-in model profiles, sorted."""
    return sorted(_PROFILES)


def served_model_name(name: str) -> str:
    """The name a real server would report for profile `name` (the HF repo id)."""
    return SERVED_MODEL_NAMES.get(name, name)
