"""The `tandem` command line."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

from services.engine.settings import RUN_KV_MEMORY_GIB, EngineSettings
from services.settings import add_flags, help_of
from tandem import cli_remote, cli_up
from tandem.run_offline import DEFAULT_ORDER, ORDERS
from tandem.sim import cli as cli_sim


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    add_flags(p, EngineSettings, "model", "dtype", "device", "block_size", "kv_memory_gib", "max_num_batched_tokens",
              "max_num_seqs", "max_model_len", "threads", defaults={"kv_memory_gib": RUN_KV_MEMORY_GIB})
    p.add_argument("--no-prefix-caching", action="store_true", help=help_of(EngineSettings, "enable_prefix_caching"))


def cmd_run(args) -> int:
    from services.engine.sampling_params import SamplingParams
    from tandem.run_offline import read_prompts, run_offline

    prompts = read_prompts(args.input)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    params.validate(vocab_size=1 << 31)
    engine = _engine_from_args(args)
    with (open(args.output, "w") if args.output else contextlib.nullcontext(sys.stdout)) as out:
        stats = run_offline(engine, prompts, params, out, order=args.order)
    engine.check_integrity()
    stats["dtype"] = str(engine.config.dtype).removeprefix("torch.")     # what --dtype (auto) resolved to
    print(json.dumps(stats), file=sys.stderr)
    return 0


def _engine_from_args(args):
    from services.engine.builder import build_engine
    return build_engine(args.model, dtype=args.dtype, device=args.device, block_size=args.block_size,
                        kv_memory_gib=args.kv_memory_gib, max_num_batched_tokens=args.max_num_batched_tokens,
                        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                        num_threads=args.threads, enable_prefix_caching=not args.no_prefix_caching)


def cmd_export_model(args) -> int:
    from services.engine.builder import load_tokenizer
    from services.engine.loader import NAMED_MODELS, export_model, resolve_model

    if args.name not in NAMED_MODELS:
        raise SystemExit(f"tandem export-model: unknown model {args.name!r}; use one of {', '.join(NAMED_MODELS)}")
    loaded = resolve_model(args.name)
    export_model(loaded, args.dir, load_tokenizer(loaded))
    print(f"wrote {args.name} to {args.dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="offline batch generation on one engine")
    _add_engine_args(run)
    run.add_argument("--input", required=True, help='JSON lines: {"prompt": ...} or {"token_ids": [...]}; - for stdin')
    run.add_argument("--output", default=None, help="write JSON lines here instead of stdout")
    run.add_argument("--max-tokens", type=int, default=16)
    run.add_argument("--temperature", type=float, default=0.0)
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--top-k", type=int, default=0)
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--ignore-eos", action="store_true")
    run.add_argument("--order", choices=ORDERS, default=DEFAULT_ORDER,
                     help="prefix (default): compute prompts grouped by shared prefix, each prefix once while its "
                          "KV is cached; input: all at once in input order. Output is in input order either way")
    run.set_defaults(func=cmd_run)
    exp = sub.add_parser("export-model", help="write a named model as a Hugging Face directory")
    exp.add_argument("name")
    exp.add_argument("dir")
    exp.set_defaults(func=cmd_export_model)
    cli_remote.register(sub)
    cli_up.register(sub)
    cli_sim.register(sub)
    return parser


def _is_user_error(e: Exception) -> bool:
    """Errors with a message that tells the user what to fix (imported only on the error path:
    `tandem generate` and `tandem admin` must not pay for importing torch)."""
    from services.engine.config import ModelConfigError
    from services.engine.sampling_params import InvalidRequestError
    from services.engine.tokenizer import TokenizerLoadError
    from tandem.run_offline import InputError
    return isinstance(e, (ModelConfigError, InvalidRequestError, InputError, TokenizerLoadError, cli_sim.CliError))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"tandem {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
