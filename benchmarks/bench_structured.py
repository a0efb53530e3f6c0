"""What structured output costs at decode: batch 16 constrained (json_schema) against unconstrained,
on one engine, in one run.

Sixteen chat prompts of the real model (smollm2-135m by default) asking for JSON. Four cases,
taking turns over the rounds (A B C / B C A / ...), each decoding the sixteen together:

  plain           no constraint (ignore_eos, so every row runs its max_tokens)
  json_inline     response_format json_schema: a schema whose arrays need many items, so the JSON
                  cannot end before max_tokens (every row stays in the batch); masks computed
                  inline in the sampler
  json_overlap    the same, masks computed on the helper thread while the forward pass runs
  json_measured   the same, the two alternated and the faster kept (services/engine/mask_mode.py);
                  `engine_default` says which mode the engine runs on this host, `measured_choice`
                  what the measurement kept

Decode throughput counts only steps that decoded all 16 rows (no prefill in them): tokens / s =
16 x steps / their seconds; medians over rounds, and (for a host shared with other jobs, where whole
rounds slow down many-fold) 16 / the 25th-percentile step time of each case over all its steps. Also the grammar's own cost per step (mask
compute, and the part the engine thread waited for) and whether every constrained output is a
valid prefix of the schema's JSON (the cost of a broken constraint would be meaningless).
Goal (issue 19): json_schema costs <= 10% of plain decode throughput. Prints the host line first,
then one JSON line.

    .venv/bin/python benchmarks/bench_structured.py [--model smollm2-135m] [--rounds 3] [--tokens 64]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.host_info import host_line  # noqa: E402

BATCH = 16
SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["title", "people"],
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "people": {"type": "array", "minItems": 40, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
            "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"},
                           "city": {"type": "string", "maxLength": 30}}}},
    },
}
TOPICS = ["a football team", "a school class", "a book club", "a chess club", "a film crew", "a choir",
          "a research lab", "a startup", "a family reunion", "a hiking group", "a band", "a kitchen staff",
          "a hospital ward", "a newsroom", "a space crew", "a village council"]


def _prompts(engine, model_file: str) -> list[list[int]]:
    from router.http_frontends import chat_template_for
    from services.engine.loader import resolve_model

    template = chat_template_for(resolve_model(model_file, weights=False))
    texts = [template.render([{"role": "user", "content": f"List the members of {t} as JSON: a title, then people "
                                                          f"with name, age and city."}]) for t in TOPICS[:BATCH]]
    return [engine.tokenizer.encode(t, add_bos=template.add_bos) for t in texts]


def _run(engine, prompts, params) -> dict:
    """Decode the batch; seconds and steps of the all-16 decode steps, and the outputs."""
    ids = [engine.add_request(p, params) for p in prompts]
    steps, seconds, outputs, step_s = 0, 0.0, {}, []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = o
        dt = time.perf_counter() - t0
        if engine.last_step_decodes == BATCH and engine.last_step_prefill_tokens == 0:
            steps += 1
            seconds += dt
            step_s.append(dt)
    return {"steps": steps, "seconds": seconds, "step_s": step_s, "outputs": [outputs[i] for i in ids]}


def _valid_json_prefix(engine, text: str) -> bool:
    """Does the schema's grammar accept `text` as a prefix (the output stopped at max_tokens)?"""
    from llguidance import LLMatcher

    from services.engine.grammar import grammar_of, ll_tokenizer
    from services.engine.sampling_params import StructuredKind, StructuredOutput

    ll = ll_tokenizer(engine.tokenizer, engine.config.model.vocab_size)
    matcher = LLMatcher(ll, grammar_of(StructuredOutput(StructuredKind.JSON_SCHEMA, json.dumps(SCHEMA))), log_level=0)
    return matcher.consume_tokens(engine.tokenizer.encode(text, add_bos=False)) or matcher.is_accepting()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    from services.engine import grammar
    from services.engine.builder import build_engine
    from services.engine.loader import resolve_model
    from services.engine.mask_mode import MaskModeChooser
    from services.engine.sampling_params import SamplingParams, StructuredKind, StructuredOutput

    print(json.dumps(host_line()), flush=True)
    loaded = resolve_model(args.model)
    engine = build_engine(args.model, loaded=loaded, dtype=args.dtype, device=args.device, num_threads=args.threads,
                          max_num_batched_tokens=4096)
    prompts = _prompts(engine, args.model)
    structured = StructuredOutput(StructuredKind.JSON_SCHEMA, json.dumps(SCHEMA))
    cases = {
        "plain": SamplingParams(max_tokens=args.tokens, ignore_eos=True),        # text too, as the others
        "json_inline": SamplingParams(max_tokens=args.tokens, structured_output=structured),
        "json_overlap": SamplingParams(max_tokens=args.tokens, structured_output=structured),
        "json_measured": SamplingParams(max_tokens=args.tokens, structured_output=structured),
    }
    masker = engine.runner.grammar
    default = "json_" + masker.mode
    for mode in ("inline", "overlap"):                      # warm-up: kernels, tokenizer view, grammar, executors
        masker.mode = mode
        _run(engine, prompts[:2], cases["json_" + mode])
    _run(engine, prompts[:2], cases["plain"])
    masker.chooser = MaskModeChooser()                      # the measured case starts measuring afresh
    rates = {name: [] for name in cases}
    step_s = {name: [] for name in cases}
    grammar_ms = {name: {"compute": [], "waited": []} for name in cases if name != "plain"}
    valid, lengths = [], []
    names = list(cases)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            masker.mode = name.removeprefix("json_") if name != "plain" else default.removeprefix("json_")
            before = grammar.MaskStats(**vars(masker.stats))
            res = _run(engine, prompts, cases[name])
            rates[name].append(BATCH * res["steps"] / res["seconds"] if res["seconds"] else 0.0)
            step_s[name] += res["step_s"]
            if name != "plain":
                steps = masker.stats.steps - before.steps
                grammar_ms[name]["compute"].append(1e3 * (masker.stats.compute_s - before.compute_s) / max(steps, 1))
                grammar_ms[name]["waited"].append(1e3 * (masker.stats.wait_s - before.wait_s) / max(steps, 1))
                valid += [_valid_json_prefix(engine, o.text) for o in res["outputs"]]
                lengths += [len(o.token_ids) for o in res["outputs"]]
    engine.check_integrity()
    med = {name: statistics.median(v) for name, v in rates.items()}
    # Other jobs on a shared host slow whole rounds down many-fold; the fast quartile of the steps
    # (each case's 25th percentile step time) is what the engine does when it has the cores.
    q1 = {name: BATCH / statistics.quantiles(v, n=4)[0] for name, v in step_s.items()}
    print(json.dumps({
        "bench": "structured", "model": args.model, "dtype": str(engine.config.dtype).removeprefix("torch."),
        "device": args.device, "batch": BATCH, "max_tokens": args.tokens, "rounds": args.rounds,
        "library": grammar.LIBRARY, "library_version": grammar.LIBRARY_VERSION, "engine_default": default,
        "measured_choice": {None: "still measuring", True: "overlap", False: "inline"}[masker.chooser.chosen],
        "decode_tok_s": {k: round(v, 1) for k, v in med.items()},
        "decode_tok_s_rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "cost_vs_plain": {k: round(1 - med[k] / med["plain"], 4) for k in med if k != "plain"},
        "decode_tok_s_fast_quartile": {k: round(v, 1) for k, v in q1.items()},
        "cost_vs_plain_fast_quartile": {k: round(1 - q1[k] / q1["plain"], 4) for k in q1 if k != "plain"},
        "host_load_avg": [round(x, 2) for x in os.getloadavg()],
        "grammar_ms_per_step": {k: {m: round(statistics.median(x), 3) for m, x in v.items()}
                                for k, v in grammar_ms.items()},
        "constrained_outputs_valid": f"{sum(valid)}/{len(valid)}",
        "constrained_min_tokens": min(lengths) if lengths else 0,
        "goal_cost_le": 0.10,
        "host": host_line(),
    }), flush=True)


if __name__ == "__main__":
    main()
