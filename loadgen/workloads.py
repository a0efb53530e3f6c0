"""Workloads: trace files and synthetic specs turned into a seeded schedule of request specs.

    wl = build_workload(WorkloadConfig(trace="…/AzureLLMInferenceTrace_conv.csv", max_requests=100,
                                       max_input_tokens=1024, max_output_tokens=128, seed=1))
    for spec in wl.requests: wl.prompt(spec)   # token ids, deterministic from (seed, spec)

Formats (chosen by content, see `load_rows`):
- Azure LLM inference CSV: `TIMESTAMP, ContextTokens, GeneratedTokens` (timestamps replayed).
- ShareGPT length statistics CSV: `num_prefill_tokens, num_decode_tokens, …` (no timestamps).
- Mooncake JSONL: `timestamp` (ms), `input_length`, `output_length`, `hash_ids` (one id per
  512-token block; equal ids → equal prompt blocks, so requests share prefixes block by block).
- `synthetic:n=100,input=128,output=uniform:16:64` (lengths: `N`, `uniform:A:B`,
  `normal:MEAN:STD`, `choice:A:B:…`).
- `apps:conversations=60,turns=uniform:1:4,think=2,rate=1,app=sys=512;input=64;output=128,app=…`:
  several applications, each with its shared system prompt and its own input/output lengths, in
  multi-turn conversations that re-send their history (loadgen/multiapp.py).

Contract: the same config (seed included) gives the same `requests` and the same prompts; a
different seed gives different prompts and, for random arrivals or sampling, a different schedule.
Bad input (missing column, unparsable or decreasing timestamps, no usable rows) raises
`WorkloadError` naming the file and line; rows with a zero or negative length are skipped and
counted in `Workload.skipped`.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime

import numpy as np

from loadgen import arrivals, multiapp

MOONCAKE_BLOCK_TOKENS = 512
TOKEN_LOW = 3          # prompt ids are drawn from [TOKEN_LOW, vocab_size): skips bos/eos/pad ids
_PROMPT_TAG, _BLOCK_TAG, _SAMPLE_TAG, _ARRIVAL_TAG, _SYNTH_TAG = 0, 1, 2, 3, 4
_SEGMENT_TAG = 6       # 5 is loadgen/multiapp.py's


class WorkloadError(ValueError):
    """A trace or workload spec that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Row:
    """One request as a trace states it, before selection and rescaling."""
    line: int                              # 1-based line in the file (row number for synthetic)
    timestamp_s: float | None
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()
    segments: tuple[tuple[int, int], ...] = ()      # (segment id, tokens): the prompt's shared parts


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: when to send it and how big it is."""
    index: int                 # position in the workload
    row: int                   # the trace line it came from (seeds its prompt)
    arrival_s: float           # offset from the start of the run
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()   # Mooncake prefix blocks, each `block_tokens` long
    segments: tuple[tuple[int, int], ...] = ()   # apps: (segment id, tokens), the prompt's shared parts


@dataclass(frozen=True)
class WorkloadConfig:
    trace: str
    max_requests: int | None = None
    sample: bool = False                   # seeded sample of max_requests rows instead of the first
    arrival: str | None = None             # None: "trace" when the trace has timestamps, else poisson
    rate: float | None = None              # requests/s; with trace arrivals, rescales them
    time_scale: float = 1.0                # multiplies trace offsets (0.5 = twice as fast)
    cv: float = 1.0                        # gamma arrivals
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    length_mode: str = "clip"              # "clip" each length, or "scale" all so the longest fits
    block_tokens: int = MOONCAKE_BLOCK_TOKENS   # tokens per Mooncake hash block in our prompts
    vocab_size: int = 32000
    seed: int = 0
    # Changes the prompts' tokens only (same lengths, same schedule). A goodput search gives every
    # probe its own salt: re-sent prompts would be served from the prefix cache of the last probe.
    prompt_salt: int = 0


@dataclass
class Workload:
    config: WorkloadConfig
    format: str
    requests: list[RequestSpec]
    skipped: int = 0                        # rows dropped for zero/negative lengths
    notes: list[str] = field(default_factory=list)

    def prompt(self, spec: RequestSpec) -> list[int]:
        """The prompt token ids of `spec`: its hash blocks (shared across requests), then ids of its own."""
        return make_prompt(spec, self.config.seed, self.config.vocab_size, self.config.block_tokens,
                           self.config.prompt_salt)

    def describe(self) -> dict:
        """A JSON-able description for reports."""
        ins = [r.input_tokens for r in self.requests]
        outs = [r.output_tokens for r in self.requests]
        offsets = [r.arrival_s for r in self.requests]
        rate, cv = arrivals.empirical(offsets)
        return {"config": asdict(self.config), "format": self.format, "requests": len(self.requests),
                "skipped_rows": self.skipped, "notes": self.notes,
                "duration_s": offsets[-1] if offsets else 0.0,
                "offered_rate_rps": None if np.isnan(rate) else rate,
                "interarrival_cv": None if np.isnan(cv) else cv,
                "input_tokens": _stats(ins), "output_tokens": _stats(outs)}


def _stats(xs) -> dict | None:
    if not xs:
        return None
    a = np.asarray(xs, dtype=float)
    return {"mean": float(a.mean()), "min": int(a.min()), "p50": float(np.percentile(a, 50)),
            "p99": float(np.percentile(a, 99)), "max": int(a.max())}


def make_prompt(spec: RequestSpec, seed: int, vocab_size: int, block_tokens: int, salt: int = 0) -> list[int]:
    if vocab_size <= TOKEN_LOW:
        raise ValueError(f"vocab size must be > {TOKEN_LOW}, got {vocab_size}")
    ids: list[int] = []
    for sid, n in spec.segments:        # equal segment ids → equal tokens, in any request
        if len(ids) >= spec.input_tokens:
            break
        rng = np.random.default_rng([seed, _SEGMENT_TAG, sid] + ([salt] if salt else []))
        ids.extend(rng.integers(TOKEN_LOW, vocab_size, size=n).tolist())
    for h in spec.hash_ids:
        if len(ids) >= spec.input_tokens:
            break
        rng = np.random.default_rng([seed, _BLOCK_TAG, h] + ([salt] if salt else []))
        ids.extend(rng.integers(TOKEN_LOW, vocab_size, size=block_tokens).tolist())
    del ids[spec.input_tokens:]
    rest = spec.input_tokens - len(ids)
    if rest > 0:
        rng = np.random.default_rng([seed, _PROMPT_TAG, spec.row] + ([salt] if salt else []))
        ids.extend(rng.integers(TOKEN_LOW, vocab_size, size=rest).tolist())
    return ids


# ---------------------------------------------------------------------------------------- loading

def load_rows(trace: str, seed: int = 0, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> tuple[str, list[Row]]:
    """(format name, rows) of a trace file or a `synthetic:` spec."""
    if trace.startswith("synthetic:"):
        return "synthetic", _synthetic_rows(trace.removeprefix("synthetic:"), seed)
    if trace.startswith("apps:"):
        return "apps", _apps_rows(trace.removeprefix("apps:"), seed)
    if not os.path.isfile(trace):
        raise WorkloadError(f"{trace}: no such trace file")
    with open(trace, newline="") as f:
        first = f.readline()
    if first.lstrip().startswith("{"):
        return "mooncake", _mooncake_rows(trace, block_tokens)
    header = [h.strip() for h in first.strip().split(",")]
    if "TIMESTAMP" in header or "ContextTokens" in header:
        return "azure", _csv_rows(trace, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"), _azure_time)
    if "num_prefill_tokens" in header or "num_decode_tokens" in header:
        return "sharegpt", _csv_rows(trace, (None, "num_prefill_tokens", "num_decode_tokens"), None)
    raise WorkloadError(f"{trace}: unknown trace format (header {first.strip()[:80]!r}); expected Azure "
                        "(TIMESTAMP,ContextTokens,GeneratedTokens), ShareGPT stats (num_prefill_tokens,"
                        "num_decode_tokens) or Mooncake JSONL")


def _azure_time(text: str) -> float:
    # "2023-11-16 18:17:03.9799600": 7 fractional digits, more than fromisoformat takes before 3.11
    head, _, frac = text.strip().partition(".")
    t = datetime.fromisoformat(head).timestamp()
    return t + (float("0." + frac) if frac else 0.0)


def _int(text: str, what: str, where: str) -> int:
    try:
        return int(float(text))
    except (TypeError, ValueError):
        raise WorkloadError(f"{where}: {what} {text!r} is not a number") from None


def _csv_rows(path: str, columns: tuple[str | None, str, str], parse_time) -> list[Row]:
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        missing = [c for c in columns if c is not None and c not in header]
        if missing:
            raise WorkloadError(f"{path}: missing column(s) {', '.join(missing)} (header: {', '.join(header)})")
        time_col, in_col, out_col = columns
        for line, rec in enumerate(reader, start=2):
            where = f"{path}:{line}"
            ts = None
            if time_col is not None:
                try:
                    ts = parse_time(rec[time_col])
                except (TypeError, ValueError):
                    raise WorkloadError(f"{where}: bad timestamp {rec[time_col]!r}") from None
            rows.append(Row(line, ts, _int(rec[in_col], in_col, where), _int(rec[out_col], out_col, where)))
    return rows


def _mooncake_rows(path: str, block_tokens: int) -> list[Row]:
    scale = block_tokens / MOONCAKE_BLOCK_TOKENS
    rows = []
    with open(path) as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path}:{line}"
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise WorkloadError(f"{where}: not JSON ({e.msg})") from None
            for key in ("timestamp", "input_length", "output_length"):
                if key not in rec:
                    raise WorkloadError(f"{where}: missing field {key!r}")
            try:
                ts = float(rec["timestamp"]) / 1000.0
            except (TypeError, ValueError):
                raise WorkloadError(f"{where}: bad timestamp {rec['timestamp']!r}") from None
            inp = _int(rec["input_length"], "input_length", where)
            rows.append(Row(line, ts, max(1, round(inp * scale)) if inp > 0 else inp,
                            _int(rec["output_length"], "output_length", where),
                            tuple(int(h) for h in rec.get("hash_ids") or ())))
    return rows


def _length_sampler(text: str, rng: np.random.Generator, where: str):
    kind, *args = text.split(":")
    try:
        vals = [float(a) for a in args]
        if not args:
            n = int(kind)
            return lambda: n
        if kind == "uniform" and len(vals) == 2:
            return lambda: int(rng.integers(int(vals[0]), int(vals[1]) + 1))
        if kind == "normal" and len(vals) == 2:
            return lambda: max(1, round(rng.normal(vals[0], vals[1])))
        if kind == "choice" and vals:
            return lambda: int(rng.choice(vals))
    except ValueError:
        pass
    raise WorkloadError(f"{where}: bad length {text!r}; use N, uniform:A:B, normal:MEAN:STD or choice:A:B:...")


def _synthetic_rows(spec: str, seed: int) -> list[Row]:
    where = f"synthetic:{spec}"
    opts = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
    unknown = set(opts) - {"n", "input", "output"}
    if unknown or "n" not in opts:
        raise WorkloadError(f"{where}: give n=COUNT,input=LEN,output=LEN (unknown: {sorted(unknown)})")
    rng = np.random.default_rng([seed, _SYNTH_TAG])
    inp = _length_sampler(opts.get("input", "128"), rng, where)
    out = _length_sampler(opts.get("output", "32"), rng, where)
    return [Row(i + 1, None, inp(), out()) for i in range(_int(opts["n"], "n", where))]


def _apps_rows(spec: str, seed: int) -> list[Row]:
    conv = multiapp.parse_spec(spec, WorkloadError)
    where = f"apps:{spec}"
    turns = multiapp.generate(conv, seed, lambda text, rng: _length_sampler(text, rng, where))
    return [Row(i + 1, t.timestamp_s, t.input_tokens, t.output_tokens, segments=t.segments)
            for i, t in enumerate(turns)]


# ------------------------------------------------------------------------------------- building

def _fit(values: np.ndarray, limit: int | None, mode: str) -> np.ndarray:
    if limit is None:
        return values
    if mode == "scale" and values.size and values.max() > limit:
        values = np.rint(values * (limit / values.max()))
    return np.clip(values, 1, limit).astype(int)


def build_workload(config: WorkloadConfig) -> Workload:
    """The workload of `config` (see module docstring); raises WorkloadError on bad input."""
    if config.length_mode not in ("clip", "scale"):
        raise WorkloadError(f"length mode must be clip or scale, got {config.length_mode!r}")
    fmt, rows = load_rows(config.trace, config.seed, config.block_tokens)
    usable = [r for r in rows if r.input_tokens > 0 and r.output_tokens > 0]
    skipped = len(rows) - len(usable)
    notes = [f"skipped {skipped} row(s) with a zero or negative length"] if skipped else []
    if config.max_requests is not None and config.max_requests < len(usable):
        if config.sample:
            rng = np.random.default_rng([config.seed, _SAMPLE_TAG])
            keep = np.sort(rng.choice(len(usable), size=config.max_requests, replace=False))
            usable = [usable[i] for i in keep]
        else:
            usable = usable[:config.max_requests]
    if not usable:
        raise WorkloadError(f"{config.trace}: no usable requests")
    offsets = _schedule(config, usable)
    ins = _fit(np.array([r.input_tokens for r in usable]), config.max_input_tokens, config.length_mode)
    outs = _fit(np.array([r.output_tokens for r in usable]), config.max_output_tokens, config.length_mode)
    requests = [RequestSpec(i, r.line, float(offsets[i]), int(ins[i]), int(outs[i]), r.hash_ids, r.segments)
                for i, r in enumerate(usable)]
    return Workload(config, fmt, requests, skipped, notes)


def _schedule(config: WorkloadConfig, rows: list[Row]) -> np.ndarray:
    has_times = all(r.timestamp_s is not None for r in rows)
    kind = config.arrival or ("trace" if has_times else "poisson")
    if kind not in arrivals.KINDS:
        raise WorkloadError(f"unknown arrival process {kind!r}; one of {', '.join(arrivals.KINDS)}")
    if kind == "trace":
        if not has_times:
            raise WorkloadError(f"{config.trace}: has no timestamps; choose --arrival poisson|gamma|constant")
        ts = np.array([r.timestamp_s for r in rows])
        order = np.argsort(ts, kind="stable")
        if np.any(order != np.arange(len(ts))):
            bad = rows[int(np.argmax(np.diff(ts) < 0)) + 1]
            raise WorkloadError(f"{config.trace}:{bad.line}: timestamp goes backwards")
        try:
            return arrivals.from_trace(ts, config.time_scale, config.rate)
        except ValueError as e:
            raise WorkloadError(f"{config.trace}: {e}") from None
    rate = config.rate
    if rate is None:
        rate = _trace_rate(rows) if has_times else None
        if rate is None:
            raise WorkloadError(f"--arrival {kind} needs --rate (the trace gives no rate)")
        rate /= config.time_scale
    rng = np.random.default_rng([config.seed, _ARRIVAL_TAG])
    n = len(rows)
    if kind == "poisson":
        return arrivals.poisson(n, rate, rng)
    if kind == "gamma":
        return arrivals.gamma(n, rate, config.cv, rng)
    return arrivals.constant(n, rate)


def _trace_rate(rows: list[Row]) -> float | None:
    span = rows[-1].timestamp_s - rows[0].timestamp_s
    return (len(rows) - 1) / span if len(rows) > 1 and span > 0 else None
