"""Frozen configuration dataclasses, one per layer. Imports nothing from the package."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (HF `LlamaConfig` field meanings)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("ModelConfig.num_heads must be a multiple of num_kv_heads")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache geometry."""

    block_size: int = 16
    num_blocks: int = 0  # 0: derive from kv_cache_bytes
    kv_cache_bytes: int = 512 * 1024 * 1024
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError("CacheConfig.block_size must be a positive power of two")
        if self.num_blocks < 0 or self.kv_cache_bytes <= 0:
            raise ValueError("CacheConfig.num_blocks/kv_cache_bytes must be non-negative/positive")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: a per-step token budget shared by decodes and prefill chunks."""

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    max_model_len: int = 8192
    long_prefill_token_threshold: int = 0  # 0: a single prompt may take the whole budget

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens <= 0 or self.max_num_seqs <= 0 or self.max_model_len <= 0:
            raise ValueError("SchedulerConfig limits must be positive")


@dataclass(frozen=True)
class LimitsConfig:
    """Caps on what one request may ask for (validated at the API edge and again in the engine)."""

    max_tokens_cap: int = 4096
    max_n: int = 8
    max_logprobs: int = 20
    max_stop_strings: int = 16
    max_stop_string_len: int = 256


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine core needs; travels to the engine process as a whole."""

    model: str = ""  # path to a GGUF file or an HF directory; "" = embedded default model
    dtype: str = "float32"
    device: str = "cpu"
    num_threads: int = 0  # 0: leave torch's default
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    weights_cache_dir: str = ""  # "" = ~/.cache/rtserve
