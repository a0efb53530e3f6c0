"""Block arithmetic shared by the engine, the worker, the router and the simulator."""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for integers, b > 0: e.g. the blocks that hold `a` tokens at `b` per block."""
    return -(-a // b)
