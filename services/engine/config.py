"""Frozen configuration, built once and passed down. Derived values are properties."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.engine.queue_order import DEFAULT_AGING_S, DISPLACE_RATIO
from services.roles import Role  # noqa: F401  (re-exported: the engine's role is the cluster's)


class ModelConfigError(ValueError):
    """A model directory or config the engine cannot serve; the message says what to fix."""


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int
    head_dim: int = 0                      # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, object], ...] = ()   # sorted items of the HF dict; () = none
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    model_id: str = "unnamed"

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        self.check()

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def check(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "max_position_embeddings", "head_dim")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"config.json: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ModelConfigError(f"config.json: head_dim must be even for RoPE, got {self.head_dim}")
        rope_type = self.rope_scaling_dict.get("rope_type", self.rope_scaling_dict.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelConfigError(
                f"config.json: rope_scaling type {rope_type!r} is not supported; use one of "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}")

    @classmethod
    def from_hf(cls, cfg: dict, model_id: str) -> "ModelConfig":
        """Build from a Hugging Face LlamaConfig dict (legacy `rope_scaling` or v5 `rope_parameters`)."""
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        if cfg.get("model_type", "llama") != "llama" or "LlamaForCausalLM" not in archs:
            raise ModelConfigError(
                f"config.json: architecture {archs} / model_type {cfg.get('model_type')!r} is not supported; "
                "Tandem serves LlamaForCausalLM (model_type 'llama') models")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ModelConfigError("config.json: attention_bias/mlp_bias are not supported; both must be false")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"config.json: hidden_act {cfg.get('hidden_act')!r} is not supported; use 'silu'")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ModelConfigError(f"config.json is missing {', '.join(missing)}; add them or re-export the model")
        rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        eos = cfg.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            head_dim=cfg.get("head_dim") or 0, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=tuple(sorted(rope.items())),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids, model_id=model_id)

    def to_hf(self) -> dict:
        """A config.json dict that transformers' LlamaForCausalLM loads."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict or None, "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            "torch_dtype": "float32",
        }


@dataclass(frozen=True)
class CacheConfig:
    """KV cache sizing. num_blocks wins; then, on CUDA, gpu_memory_utilization; then memory_budget_bytes."""
    block_size: int = 16
    num_blocks: int | None = None
    memory_budget_bytes: int = 2 << 30
    gpu_memory_utilization: float | None = None   # CUDA only: this instance's share of the GPU (device.plan_num_blocks)
    enable_prefix_caching: bool = True


MIXED_PREFILL_MODES = ("chunked", "layered")     # SchedulerConfig.mixed_prefill_mode


@dataclass(frozen=True)
class SchedulerConfig:
    role: Role = Role.COLOCATED
    max_num_seqs: int = 256                 # running requests per step
    max_num_batched_tokens: int = 2048      # token budget per step (decode + prefill chunks)
    long_prefill_token_threshold: int = 0   # 0: a single prompt may take the whole budget
    policy: str = "fcfs"                   # fcfs | priority | sjf (services/engine/policy.py)
    aging_s: float = DEFAULT_AGING_S        # sjf: waited this long, a request is served by arrival
    displace_ratio: float = DISPLACE_RATIO  # sjf: how much shorter a request must be to take a full batch's slot (0: never)
    # Prefill tokens a step may add beside running decodes (Sarathi-style chunking that bounds the
    # decodes' inter-token time); 0: no cap beyond max_num_batched_tokens. Changeable at run time.
    mixed_prefill_tokens: int = 0
    # How a prompt shares steps with running decodes under that cap: "chunked" (Sarathi-Serve: a chunk
    # of its tokens through every layer each step) or "layered" ("From Tokens to Layers": all its
    # tokens through a group of layers each step, the group sized so tokens x layers / num_layers
    # stays within the cap, so each weight is still read once per step). Layered is the default:
    # benchmarks/bench_mixed_prefill.py measured it costing the decodes less per prompt token at
    # small caps and never more (figures in the README).
    mixed_prefill_mode: str = "layered"
    # What a request preempted for blocks loses (services/engine/preemption.py): "recompute" (its KV;
    # exact), "compress" (its KV is kept in int8 and restored on re-admission: lossy), "auto" (the
    # cheaper of the two by measured cost). Recompute by default: greedy tokens stay exactly HF's.
    preemption_mode: str = "recompute"
    # Compressed copies may hold at most this share of the KV pool's bytes (beyond the pool).
    kv_compress_fraction: float = 0.25


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    num_threads: int | None = None          # torch intra-op threads; None leaves torch's default
    max_tokens_limit: int | None = None     # per-request cap on max_tokens; None = context only

    @property
    def max_model_len(self) -> int:
        return self.model.max_position_embeddings

    def kv_bytes_per_block(self) -> int:
        m = self.model
        return 2 * m.num_layers * self.cache.block_size * m.kv_size * torch.empty((), dtype=self.dtype).element_size()

    def resolve_num_blocks(self) -> int:
        """num_blocks, else as many blocks as memory_budget_bytes holds (at least one)."""
        if self.cache.num_blocks is not None:
            return self.cache.num_blocks
        return max(1, self.cache.memory_budget_bytes // self.kv_bytes_per_block())
