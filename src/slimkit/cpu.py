"""What the CPU at hand can do: its model name and the instruction sets that decide which
kernels are fast (int8 dot products, bf16 arithmetic). Read from ``/proc/cpuinfo`` once;
empty where that is not readable (then no fast path is assumed)."""

from __future__ import annotations

import functools

#: instruction sets with int8 dot products
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
#: instruction sets with bf16 arithmetic
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "", frozenset[str]()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def cpu_flags() -> frozenset[str]:
    return _cpuinfo()[1]


def cpu_model() -> str:
    return _cpuinfo()[0] or "unknown CPU"


def has_int8_dot() -> bool:
    """True when the CPU has VNNI or AMX int8 dot-product instructions."""
    return bool(cpu_flags() & set(INT8_FLAGS))


def has_bf16() -> bool:
    """True when the CPU computes in bf16 natively (AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_flags() & set(BF16_FLAGS))


def device() -> str:
    """The CPU model and the int8 / bf16 instruction sets found, in one line."""
    found = [f for f in (*INT8_FLAGS, *BF16_FLAGS) if f in cpu_flags()]
    return f"{cpu_model()} ({', '.join(found) or 'no int8 or bf16 instructions'})"
