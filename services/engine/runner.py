"""Turns a SchedulerOutput into tensors, runs the model, samples. The first place tensors appear.

A step's inputs are built on the host. On the CPU the model reads them where they are; on CUDA
they are packed into one pinned int64 buffer, moved with a single non_blocking copy and split on
the GPU (`place_inputs`), so building the next batch never waits for the GPU and a step makes one
host→device copy. The only intended host sync of a step is the sampler reading its tokens back.
"""
from __future__ import annotations

from dataclasses import dataclass

import logging
import time

import torch

from services.engine import device as devices
from services.engine import huge_pages
from services.engine.blocks import cdiv
from services.engine.config import EngineConfig
from services.engine.kv_compress import CompressedStore, compress_blocks, restore_blocks
from services.engine.linear import prepack_linears, prepack_supported
from services.engine.loader import LoadedModel
from services.engine.grammar import GrammarMasker
from services.engine.logits_adjust import LogitsAdjuster, combine
from services.engine.preemption import PreemptionCosts
from services.engine.model import AttentionMetadata, LayeredRows, LlamaModel, PrefillSeq
from services.engine.sampler import Sampler, SamplerOutput
from services.engine.scheduler import ScheduledChunk, SchedulerOutput

log = logging.getLogger(__name__)


@dataclass
class StepInputs:
    """One step's model inputs (rows: decodes first, then each prefill chunk's tokens)."""
    input_ids: torch.Tensor        # [T] int64
    positions: torch.Tensor        # [T] int64
    logits_indices: torch.Tensor   # [S] int64: rows whose next-token logits are sampled
    meta: AttentionMetadata

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor, in the fixed order pack_inputs/unpack_inputs use."""
        m = self.meta
        return [self.input_ids, self.positions, self.logits_indices, m.slot_blocks, m.slot_offsets,
                m.decode_block_tables, m.decode_seq_lens] + [p.block_ids for p in m.prefills]


def pack_inputs(inputs: StepInputs) -> tuple[torch.Tensor, list[torch.Size]]:
    """All of a step's host tensors as one flat int64 tensor, plus each tensor's shape."""
    parts = inputs.tensors()
    return torch.cat([t.reshape(-1).to(torch.int64) for t in parts]), [t.shape for t in parts]


def unpack_inputs(flat: torch.Tensor, shapes: list[torch.Size], like: StepInputs) -> StepInputs:
    """Inverse of pack_inputs on `flat`'s device: views of `flat` (int64) in `like`'s structure."""
    views = [v.view(shape) for v, shape in zip(flat.split([s.numel() for s in shapes]), shapes)]
    ids, pos, logits_idx, sb, so, bt, sl = views[:7]
    m = like.meta
    prefills = [PrefillSeq(p.q_start, p.q_len, p.ctx_len, b) for p, b in zip(m.prefills, views[7:])]
    return StepInputs(ids, pos, logits_idx,
                      AttentionMetadata(sb, so, m.num_decode, bt, sl, prefills, m.decode_max_len, m.layered))


def place_inputs(inputs: StepInputs, device: torch.device) -> StepInputs:
    """`inputs` where the model runs: unchanged on the CPU; elsewhere one pinned, non_blocking copy.

    The pinned buffer comes from torch's caching host allocator, which keeps it from reuse until
    the copy has completed, so the host may build the next step at once.
    """
    if device.type == "cpu":
        return inputs
    flat, shapes = pack_inputs(inputs)
    return unpack_inputs(flat.pin_memory().to(device, non_blocking=True), shapes, inputs)


class ModelRunner:
    """Owns the model weights and the KV tensor; block ids come from the scheduler's KVCacheManager."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel, num_blocks: int, block_tables, tokenizer=None):
        """block_tables: callable request_id → list of block ids (KVCacheManager.block_table).
        tokenizer: the model's (structured output builds its grammars' vocabulary from it; None:
        requests with structured_output are not served here).

        Weights are created directly in the engine dtype on the engine device (the HF float32
        tensors are converted while copied in: the same rounding as converting afterwards).
        Raises ModelConfigError when the dtype cannot run on the device (sizes were checked by
        device.plan_num_blocks).
        """
        self.config = config
        self.device = devices.torch_device(config.device)
        devices.check_dtype(self.device, config.dtype)
        self.block_size = config.cache.block_size
        self.block_tables = block_tables
        m = config.model
        with torch.device("meta"):
            model = LlamaModel(m)
        model = model.to(config.dtype).to_empty(device=self.device)
        model.load_hf_weights(loaded.tensors)
        if m.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        packable, why_not = prepack_supported(self.device, config.dtype)
        if packable:
            log.info("linear weights pre-packed for oneDNN (%d layers, %s)", prepack_linears(model), config.dtype)
        else:
            log.info("linear weights used as loaded: %s", why_not)
        self.model = model.eval()
        self.model.init_rotary(self.device)
        # kv: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
        self.kv = huge_pages.zeros((num_blocks, m.num_layers, 2, self.block_size, m.num_kv_heads, m.head_dim),
                                   dtype=config.dtype, device=self.device)
        self.sampler = Sampler()
        self.adjuster = LogitsAdjuster(m.vocab_size, self.device)   # penalties, logit_bias, min_tokens
        self.grammar = GrammarMasker(tokenizer, m.vocab_size, self.device) if tokenizer is not None else None

    def bind_thread(self) -> None:
        """Call on the thread that will run steps (the engine thread): makes the engine's GPU its
        current CUDA device. No-op on CPU."""
        devices.bind_thread(self.device)

    def build_inputs(self, out: SchedulerOutput) -> StepInputs:
        """The step's model inputs on the host (CPU tensors), rows in SchedulerOutput order."""
        ids, positions, slot_blocks, slot_offsets = [], [], [], []
        for chunk in out.decodes:
            r = chunk.request
            pos = r.num_computed_tokens
            ids.append(r.output_token_ids[-1] if pos >= r.num_prompt_tokens else r.prompt_token_ids[pos])
            positions.append(pos)
        decode_tables = [self.block_tables(c.request.request_id) for c in out.decodes]
        for table, pos in zip(decode_tables, positions):
            slot_blocks.append(table[pos // self.block_size])
            slot_offsets.append(pos % self.block_size)
        nd = len(out.decodes)
        ids_t = torch.tensor(ids, dtype=torch.long)                  # [nd]
        pos_t = torch.tensor(positions, dtype=torch.long)
        sb_t = torch.tensor(slot_blocks, dtype=torch.long)
        so_t = torch.tensor(slot_offsets, dtype=torch.long)

        prefills, parts, q_start, layered = [], [], nd, None
        sampling_rows = list(range(nd))
        for chunk in out.prefills:          # a layered chunk is the last one (the scheduler's order)
            if chunk.layers is not None:
                layered = LayeredRows(q_start, chunk.layers.first, chunk.layers.end, chunk.request.layer_hidden)
            r, n = chunk.request, chunk.num_new_tokens
            start = r.num_computed_tokens
            table = torch.tensor(self.block_tables(r.request_id), dtype=torch.long)
            p = torch.arange(start, start + n)
            parts.append((torch.tensor(r.token_ids(start, start + n), dtype=torch.long), p,
                          table[p // self.block_size], p % self.block_size))
            ctx = start + n
            prefills.append(PrefillSeq(q_start, n, ctx, table[: cdiv(ctx, self.block_size)]))
            if chunk.samples:
                sampling_rows += [q_start + n - 1] * (1 + len(chunk.followers))   # followers share the row
            q_start += n
        if parts:
            ids_t = torch.cat([ids_t] + [x[0] for x in parts])      # [T]
            pos_t = torch.cat([pos_t] + [x[1] for x in parts])
            sb_t = torch.cat([sb_t] + [x[2] for x in parts])
            so_t = torch.cat([so_t] + [x[3] for x in parts])
        max_blocks = max((len(t) for t in decode_tables), default=0)
        bt = torch.tensor([t + [0] * (max_blocks - len(t)) for t in decode_tables],
                          dtype=torch.int32).view(nd, max_blocks)       # [num_decode, max_blocks]
        meta = AttentionMetadata(
            slot_blocks=sb_t, slot_offsets=so_t, num_decode=nd, decode_block_tables=bt,
            decode_seq_lens=torch.tensor([p + 1 for p in positions], dtype=torch.int32), prefills=prefills,
            decode_max_len=max(positions) + 1 if nd else 0, layered=layered)
        return StepInputs(ids_t, pos_t, torch.tensor(sampling_rows, dtype=torch.long), meta)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """kv[dst] = kv[src] (every layer, K and V) for each (src, dst) block pair; every source is
        read before any destination is written."""
        if not pairs:
            return
        src = torch.tensor([a for a, _ in pairs], dtype=torch.long, device=self.kv.device)   # [P]
        dst = torch.tensor([b for _, b in pairs], dtype=torch.long, device=self.kv.device)
        self.kv.index_copy_(0, dst, self.kv.index_select(0, src))

    def move_kv(self, out: SchedulerOutput, store: CompressedStore, costs: PreemptionCosts) -> None:
        """Apply the step's compressed-preemption copies before its forward writes any block: the
        saves (out of blocks just freed, still intact), then the restores (into blocks just
        allocated, possibly the same ones). Their times feed the preemption cost model."""
        if not (out.kv_saves or out.kv_restores):
            return
        t0 = time.perf_counter()
        for s in out.kv_saves:
            store.fill(s.request_id, compress_blocks(self.kv, s.block_ids))
        t1 = time.perf_counter()
        for r in out.kv_restores:
            restore_blocks(self.kv, r.data, r.block_ids, r.skip)
        t2 = time.perf_counter()
        costs.observe_copy(sum(len(s.block_ids) for s in out.kv_saves), t1 - t0,
                           sum(len(r.block_ids) for r in out.kv_restores), t2 - t1)

    def time_kv_copy(self) -> None:
        """One block out to int8 and back (block 0, before any request holds it): what
        PreemptionCosts.calibrate times."""
        restore_blocks(self.kv, compress_blocks(self.kv, [0]), [0])

    def execute(self, out: SchedulerOutput, on_layer_done=None) -> tuple[list[ScheduledChunk], SamplerOutput | None]:
        """Run one step. Returns the chunks that produced a token (row order) and their samples.

        on_layer_done(layer_index) runs after each layer has written this step's K/V (chunk
        counters still hold the values from before the step: a chunk covers positions
        [request.num_computed_tokens, + num_new_tokens)). On CUDA it runs when the layer's work
        has been queued on the current stream, not when it has finished: a reader of `kv` on
        another stream must wait for an event recorded on the current stream at that moment.
        """
        sampled_chunks = out.decodes + [x for c in out.prefills if c.samples
                                        for x in [c, *(ScheduledChunk(f, 0) for f in c.followers)]]
        requests = [c.request for c in sampled_chunks]
        # structured output: the grammar masks are computed on a helper thread while the model runs
        pending = self.grammar.begin(requests) if self.grammar is not None else None
        try:
            inputs = place_inputs(self.build_inputs(out), self.device)
            logits = self.model(inputs.input_ids, inputs.positions, self.kv, inputs.meta, inputs.logits_indices,
                                on_layer_done)                             # [S, vocab]
            lay = inputs.meta.layered
            if lay is not None and lay.hidden_out is not None:     # part way through its layers
                next(c for c in out.prefills if c.layers is not None).request.layer_hidden = lay.hidden_out
            if not sampled_chunks:
                return [], None
            params = [r.sampling_params for r in requests]
            indices = [r.num_output_tokens for r in requests]
            return sampled_chunks, self.sampler(logits, params, indices,
                                                combine(self.adjuster.prepare(requests), pending))
        finally:
            if pending is not None:
                pending.wait()        # the helper is done with the matchers before anything else touches them
