"""Scratch A/B driver: run profile_decode.py in two checkouts alternately, N rounds, keep each config's best.

    python benchmarks/ab_trees.py /tmp/tperf-base /work/main --rounds 3 -- --threads 1 --clock thread --breakdown
Each checkout runs its own benchmarks/profile_decode.py (copy it into the base checkout); both share this venv; other processes share the host, hence alternating rounds and best-of.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--")
    trees, rest, prof_args = [], argv[:split], argv[split + 1:]
    rounds = 3
    i = 0
    while i < len(rest):
        if rest[i] == "--rounds":
            rounds = int(rest[i + 1])
            i += 2
        else:
            trees.append(rest[i])
            i += 1
    py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "bin", "python")
    best: dict[tuple, dict] = {}
    for r in range(rounds):
        for tree in trees:
            # each checkout's own copy: profile_decode.py imports the services/ beside it
            script = os.path.join(tree, "benchmarks", "profile_decode.py")
            proc = subprocess.run([py, script, *prof_args], cwd=tree, capture_output=True, text=True)
            for line in proc.stdout.splitlines():
                if not line.startswith("{"):
                    continue
                d = json.loads(line)
                key = (tree, d.get("threads"), d.get("batch"), d.get("context"), d.get("tokens"))
                metric = "ms" if "tokens" in d and d.get("tokens") else ("forward" if "forward" in d else "best_ms")
                if key not in best or d[metric] < best[key][metric]:
                    best[key] = d
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
    for key in sorted(best, key=lambda k: tuple(str(x) for x in k[1:]) + (k[0],)):
        print(json.dumps({"tree": key[0], **best[key]}))


if __name__ == "__main__":
    main()
