"""Tandem's inference engine: model, paged KV cache, scheduler, runner, sampler."""
