"""`tandem generate` and `tandem admin --addr A instances|migrate|drain`: the client SDK on the command line.

A failed RPC prints `tandem <command>: <STATUS>: <details>` to stderr, never a traceback, and
exits 2 for INVALID_ARGUMENT, 1 otherwise. A router that requires API keys gets TANDEM_API_KEY
(else the cluster token, which its Admin API accepts; services/auth.py).
"""
from __future__ import annotations

import argparse
import json
import sys

from services.auth import client_credential
from services.roles import WorkerState

_INSTANCE_COLUMNS = ("ID", "ROLE", "STATE", "ADDRESS", "FREE/TOTAL", "RUNNING", "WAITING", "QUEUED", "STEP_MS",
                     "LEASES", "SWITCHES")


def register(subparsers) -> None:
    """Add `generate` and `admin` to the `tandem` parser's subcommands."""
    gen = subparsers.add_parser("generate", help="stream one completion from a running cluster")
    gen.add_argument("--addr", required=True, help="router gRPC address, host:port")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--token-ids", type=_token_ids, help="prompt token ids, comma-separated: 1,2,3")
    gen.add_argument("--max-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, default=None, help="default: the server's (greedy)")
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--timeout", type=float, default=None, help="deadline for the whole stream, seconds")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.set_defaults(func=cmd_generate)

    admin = subparsers.add_parser("admin", help="inspect a running cluster")
    admin.add_argument("--addr", required=True, help="router gRPC address, host:port")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    instances = admin_sub.add_parser("instances", help="list the instances and their load")
    instances.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    instances.add_argument("--watch", type=float, default=None, metavar="SECONDS",
                           help="live load: print again every SECONDS until Ctrl-C")
    instances.set_defaults(func=cmd_admin_instances)
    migrate = admin_sub.add_parser("migrate", help="move a running request to another decode instance")
    migrate.add_argument("request_id")
    migrate.add_argument("--to", required=True, dest="to_instance", help="destination instance id")
    migrate.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the commit")
    migrate.set_defaults(func=cmd_admin_migrate)
    drain = admin_sub.add_parser("drain", help="stop new work on a decode instance and migrate its requests away")
    drain.add_argument("instance_id")
    drain.add_argument("--wait", action="store_true", help="return once the instance is drained")
    drain.add_argument("--timeout", type=float, default=600.0, help="with --wait: give up after this many seconds")
    drain.add_argument("--undo", action="store_true", help="leave draining: the instance serves again")
    drain.set_defaults(func=cmd_admin_drain)


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_generate(args) -> int:
    """Stream the text to stdout and a summary to stderr, or with --json print one JSON object."""
    from tandem.client import Client, CompletionBuilder
    from tandem.errors import TandemError

    request = dict(prompt=args.prompt, token_ids=args.token_ids, max_tokens=args.max_tokens,
                   temperature=args.temperature, top_p=args.top_p, seed=args.seed, timeout=args.timeout)
    try:
        with Client(args.addr, api_key=client_credential()) as client:
            if args.json:
                r = client.complete(**request)
            else:
                builder = CompletionBuilder()
                for chunk in client.generate(**request):
                    builder.add(chunk)
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                r = builder.build()
                sys.stdout.write("\n")
    except TandemError as e:
        return _fail("generate", e)
    if args.json:
        print(json.dumps({"request_id": r.request_id, "token_ids": r.token_ids, "text": r.text,
                          "finish_reason": r.finish_reason, "ttft_s": r.ttft_s, "tpot_s": r.tpot_s}))
    else:
        ttft = "-" if r.ttft_s is None else f"{r.ttft_s:.4f}"
        print(f"tokens={len(r.token_ids)} finish_reason={r.finish_reason} ttft_s={ttft} tpot_s={r.tpot_s:.4f}",
              file=sys.stderr)
    return 0


def cmd_admin_instances(args) -> int:
    """Print the instances and their load (QUEUED: prompt tokens waiting for prefill; STEP_MS: recent
    mean engine step) as a table, or with --json as a JSON list of objects; with --watch, again
    every few seconds until Ctrl-C."""
    import time

    from tandem.client import Client
    from tandem.errors import TandemError

    if args.watch is not None and args.watch <= 0:
        print("tandem admin instances: --watch needs a positive number of seconds", file=sys.stderr)
        return 2
    try:
        with Client(args.addr, api_key=client_credential()) as client:
            while True:
                instances = client.list_instances()
                if args.json:
                    print(json.dumps(instances), flush=True)
                else:
                    if args.watch is not None:
                        print(time.strftime("%H:%M:%S"))
                    _print_instances(instances)
                if args.watch is None:
                    return 0
                time.sleep(args.watch)
    except TandemError as e:
        return _fail("admin instances", e)
    except KeyboardInterrupt:
        return 0


def _print_instances(instances: list[dict]) -> None:
    rows = [_INSTANCE_COLUMNS] + [
        (i["id"], _role_cell(i), i["state"], i["address"], f"{i['free_blocks']}/{i['total_blocks']}",
         str(i["running"]), str(i["waiting"]), str(i.get("queued_prefill_tokens", 0)),
         f"{i.get('step_time_ms', 0.0):.1f}", str(i.get("leases", 0)), str(i.get("role_switches", 0)))
        for i in instances]
    widths = [max(len(row[c]) for row in rows) for c in range(len(_INSTANCE_COLUMNS))]
    for row in rows:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip(), flush=True)


def _role_cell(i: dict) -> str:
    """The role, and where it differs the home role: `colocated (home decode)` for a switched instance."""
    home = i.get("home_role")
    return i["role"] if not home or home == i["role"] else f"{i['role']} (home {home})"


def cmd_admin_migrate(args) -> int:
    """Exit 0 once the migration committed; 1 (with the reason) if it aborted."""
    from tandem.client import Client
    from tandem.errors import TandemError

    try:
        with Client(args.addr, api_key=client_credential()) as client:
            r = client.migrate(args.request_id, args.to_instance, timeout=args.timeout)
    except TandemError as e:
        return _fail("admin migrate", e)
    if not r.get("committed"):
        print(f"tandem admin migrate: not committed ({r.get('abort_reason', '?')}): {r.get('message', '')}; "
              f"the request goes on where it was", file=sys.stderr)
        return 1
    print(f"migrated {r['request_id']} to {args.to_instance}: {r.get('stages', 0)} stages, "
          f"{r.get('blocks_copied', 0)} blocks, downtime {1e3 * r.get('downtime_s', 0.0):.1f} ms")
    return 0


def cmd_admin_drain(args) -> int:
    """Exit 0 once draining (or, with --wait, drained); 1 if --wait timed out with requests left."""
    from tandem.client import Client
    from tandem.errors import TandemError

    try:
        with Client(args.addr, api_key=client_credential()) as client:
            r = client.drain(args.instance_id, wait=args.wait, timeout_s=args.timeout, undo=args.undo)
    except TandemError as e:
        return _fail("admin drain", e)
    print(f"{args.instance_id}: {r['state']} ({r['remaining']} requests left)")
    return 1 if args.wait and r["state"] not in (WorkerState.DRAINED, "gone") else 0


def _fail(command: str, e) -> int:
    """Report a TandemError the CLI way; the exit code: 2 for INVALID_ARGUMENT, else 1."""
    from tandem.errors import InvalidArgumentError

    print(f"tandem {command}: {e.code.name}: {e.details}", file=sys.stderr)
    return 2 if isinstance(e, InvalidArgumentError) else 1
