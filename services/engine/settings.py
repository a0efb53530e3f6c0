"""The engine's settings: one default and one help text for each, read by every command line that
builds an engine (`python -m services.worker`, `tandem run`, `tandem up`) and checked against the
Helm chart's values (tests/k8s/test_chart_defaults.py). build_engine() takes them as arguments."""
from __future__ import annotations

from dataclasses import dataclass

from services.engine.config import MIXED_PREFILL_MODES, CacheConfig, SchedulerConfig
from services.engine.preemption import PREEMPTION_MODES
from services.engine.dtype_policy import AUTO, DTYPE_CHOICES, DTYPE_HELP
from services.engine.queue_order import DEFAULT_AGING_S, DEFAULT_QUEUE_POLICY, QUEUE_POLICIES
from services.settings import setting

# `tandem run` (one offline engine, nothing else on the host to share with) budgets more KV memory
# than a worker of a cluster does; kept as it was, on purpose.
RUN_KV_MEMORY_GIB = 2.0


@dataclass(frozen=True)
class EngineSettings:
    model: str = setting("tiny", "HF model directory or a named model (tiny, small)")
    dtype: str = setting(AUTO, DTYPE_HELP, choices=DTYPE_CHOICES)
    device: str = setting("auto", "auto (CUDA when a GPU is visible, else CPU), cpu or cuda[:N]")
    gpu_memory_utilization: float | None = setting(
        None, "on CUDA without --num-blocks: size the KV cache to this share of the GPU (e.g. 0.9)", type=float)
    block_size: int = setting(CacheConfig.block_size, "tokens per KV block")
    num_blocks: int | None = setting(None, "KV blocks (overrides --kv-memory-gib)", type=int)
    kv_memory_gib: float = setting(1.0, "KV cache budget (GiB)")
    max_num_batched_tokens: int = setting(SchedulerConfig.max_num_batched_tokens, "token budget per step")
    max_num_seqs: int = setting(SchedulerConfig.max_num_seqs, "requests per step at most")
    max_model_len: int | None = setting(None, "tokens per request at most (default: the model's limit)", type=int)
    threads: int | None = setting(None, "torch intra-op threads (default: one per pinned core, else torch's)",
                                  type=int)
    queue_policy: str = setting(
        DEFAULT_QUEUE_POLICY, "order of the waiting queue: fcfs (arrival) or sjf (shortest predicted work first: "
        "the router's output-length prediction, priority classes first, with aging)", choices=QUEUE_POLICIES)
    queue_aging_s: float = setting(
        DEFAULT_AGING_S, "sjf: a request that waited this long is served in arrival order (bounds its wait)")
    displace_ratio: float = setting(
        SchedulerConfig.displace_ratio, "sjf: with every batch slot taken, a waiting request takes the slot of the "
        "running one with the most predicted work left when it is this many times shorter (0: never)")
    mixed_prefill: str = setting(
        SchedulerConfig.mixed_prefill_mode, "how a prompt shares steps with running decodes under an instance's "
        "mixed-prefill cap (adaptive pools): chunked (a chunk of its tokens through every layer a step) or "
        "layered (all its tokens through a group of layers a step)", choices=MIXED_PREFILL_MODES)
    preemption_mode: str = setting(
        SchedulerConfig.preemption_mode, "what a request preempted for KV blocks loses: recompute (its KV; exact), "
        "compress (its KV kept in int8 and restored when it resumes; greedy tokens may differ) or auto (the cheaper "
        "of the two by measured cost)", choices=PREEMPTION_MODES)
    kv_compress_fraction: float = setting(
        SchedulerConfig.kv_compress_fraction, "compressed KV of preempted requests may take at most this share of "
        "the KV pool's bytes (compress/auto)")
    enable_prefix_caching: bool = setting(CacheConfig.enable_prefix_caching, "reuse the KV of shared prompt prefixes (--no-prefix-caching: off)")


ENGINE_DEFAULTS = EngineSettings()
