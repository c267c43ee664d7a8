"""Byte counts as people read them: binary units (KiB, MiB, GiB), for the CLI and benchmarks."""

from __future__ import annotations

UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def format_bytes(n: float | None, unit: str | None = None, digits: int = 1) -> str:
    """`n` bytes as "163.4 MiB". `unit` fixes the unit, for figures read side by side in a table;
    without it the largest unit in which |n| is at least 1 (KiB for anything smaller). None, a
    size nobody could measure, reads "unknown"."""
    if n is None:
        return "unknown"
    if unit is None:
        unit = next((u for u, size in reversed(UNITS.items()) if abs(n) >= size), "KiB")
    return f"{n / UNITS[unit]:.{digits}f} {unit}"
