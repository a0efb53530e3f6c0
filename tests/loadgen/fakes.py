"""Fake targets for loadgen tests: scripted latencies, a known capacity, failures."""
from __future__ import annotations

import asyncio

from loadgen.targets import TargetError


class FakeTarget:
    """Waits `first_s` (holding one of `slots` when given), then yields one token every `gap_s`.

    Records the loop time of each call's start in `sends` and of its end in `ends`. `fail_after`:
    raise TargetError after that many tokens of every request. `hold_until_sends`: no request
    answers before that many requests were sent (a closed-loop sender would wait forever).
    """

    url = "sim:fake"

    def __init__(self, first_s: float = 0.0, gap_s: float = 0.0, slots: int | None = None,
                 fail_after: int | None = None, vocab: int | None = 100, hold_until_sends: int | None = None) -> None:
        self.first_s, self.gap_s, self.fail_after, self.vocab = first_s, gap_s, fail_after, vocab
        self._slots = asyncio.Semaphore(slots) if slots else None
        self.sends: list[float] = []
        self.ends: list[float] = []
        self._hold_until = hold_until_sends
        self._all_sent = asyncio.Event() if hold_until_sends else None
        self.prompts: list[list[int]] = []

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    async def vocab_size(self):
        return self.vocab

    def describe(self) -> dict:
        return {"kind": "fake"}

    async def stream(self, prompt, max_tokens):
        self.sends.append(asyncio.get_running_loop().time())
        self.prompts.append(list(prompt))
        if self._all_sent is not None:
            if len(self.sends) >= self._hold_until:
                self._all_sent.set()
            await self._all_sent.wait()
        if self._slots is not None:
            async with self._slots:
                await asyncio.sleep(self.first_s)
        else:
            await asyncio.sleep(self.first_s)
        for i in range(max_tokens):
            if self.fail_after is not None and i == self.fail_after:
                raise TargetError("fake failure mid-stream")
            if i:
                await asyncio.sleep(self.gap_s)
            yield 1
        self.ends.append(asyncio.get_running_loop().time())
