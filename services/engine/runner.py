"""Turns a SchedulerOutput into tensors, runs the model, samples. The first place tensors appear."""
from __future__ import annotations

import torch

from services.engine.config import EngineConfig
from services.engine.loader import LoadedModel
from services.engine.model import AttentionMetadata, LlamaModel, PrefillSeq
from services.engine.sampler import Sampler, SamplerOutput
from services.engine.scheduler import ScheduledChunk, SchedulerOutput


class ModelRunner:
    """Owns the model weights and the KV tensor; block ids come from the scheduler's KVCacheManager."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel, num_blocks: int, block_tables):
        """block_tables: callable request_id → list of block ids (KVCacheManager.block_table)."""
        self.config = config
        self.block_size = config.cache.block_size
        self.block_tables = block_tables
        m = config.model
        with torch.device("meta"):
            model = LlamaModel(m)
        model = model.to_empty(device=config.device)
        model.load_hf_weights(loaded.tensors)
        if m.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        self.model = model.to(config.dtype).eval()
        self.model.init_rotary(config.device)
        # kv: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
        self.kv = torch.zeros(num_blocks, m.num_layers, 2, self.block_size, m.num_kv_heads, m.head_dim,
                              dtype=config.dtype, device=config.device)
        self.sampler = Sampler()

    def execute(self, out: SchedulerOutput, on_layer_done=None) -> tuple[list[ScheduledChunk], SamplerOutput | None]:
        """Run one step. Returns the chunks that produced a token (row order) and their samples.

        on_layer_done(layer_index) runs after each layer has written this step's K/V (chunk
        counters still hold the values from before the step: a chunk covers positions
        [request.num_computed_tokens, + num_new_tokens)).
        """
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
        ids_t = torch.tensor(ids, dtype=torch.long)
        pos_t = torch.tensor(positions, dtype=torch.long)
        sb_t = torch.tensor(slot_blocks, dtype=torch.long)
        so_t = torch.tensor(slot_offsets, dtype=torch.long)

        prefills, parts, q_start = [], [], nd
        sampling_rows = list(range(nd))
        for chunk in out.prefills:
            r, n = chunk.request, chunk.num_new_tokens
            start = r.num_computed_tokens
            table = torch.tensor(self.block_tables(r.request_id), dtype=torch.long)
            p = torch.arange(start, start + n)
            parts.append((torch.tensor(r.token_ids(start, start + n), dtype=torch.long), p,
                          table[p // self.block_size], p % self.block_size))
            ctx = start + n
            prefills.append(PrefillSeq(q_start, n, ctx, table[: (ctx + self.block_size - 1) // self.block_size]))
            if chunk.samples:
                sampling_rows.append(q_start + n - 1)
            q_start += n
        if parts:
            ids_t = torch.cat([ids_t] + [x[0] for x in parts])
            pos_t = torch.cat([pos_t] + [x[1] for x in parts])
            sb_t = torch.cat([sb_t] + [x[2] for x in parts])
            so_t = torch.cat([so_t] + [x[3] for x in parts])
        max_blocks = max((len(t) for t in decode_tables), default=0)
        bt = torch.tensor([t + [0] * (max_blocks - len(t)) for t in decode_tables],
                          dtype=torch.int32).view(nd, max_blocks)       # [num_decode, max_blocks]
        meta = AttentionMetadata(
            slot_blocks=sb_t, slot_offsets=so_t, num_decode=nd, decode_block_tables=bt,
            decode_seq_lens=torch.tensor([p + 1 for p in positions], dtype=torch.int32), prefills=prefills)
        dev = self.config.device
        if dev != "cpu":
            meta = meta.to(dev)
        logits = self.model(ids_t.to(dev), pos_t.to(dev), self.kv, meta,
                            torch.tensor(sampling_rows, dtype=torch.long, device=dev), on_layer_done)
        sampled_chunks = out.decodes + [c for c in out.prefills if c.samples]
        if not sampled_chunks:
            return [], None
        params = [c.request.sampling_params for c in sampled_chunks]
        indices = [c.request.num_output_tokens for c in sampled_chunks]
        return sampled_chunks, self.sampler(logits, params, indices)
