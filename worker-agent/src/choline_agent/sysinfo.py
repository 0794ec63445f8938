"""What a heartbeat reports about the box: CPU %, memory in use, and each GPU's utilisation and memory.

Linux only (``/proc``); GPUs through ``nvidia-smi`` when it is on the PATH. Nothing here raises: a
reading that cannot be taken is ``None``.
"""

from __future__ import annotations

import asyncio
import shutil

from choline_core.events import GpuReport


class CpuSampler:
    """CPU use of the whole box between two calls, from ``/proc/stat``."""

    def __init__(self) -> None:
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as fh:
                fields = [int(x) for x in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    def percent(self) -> float | None:
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[0] <= last[0]:
            return None
        total, idle = now[0] - last[0], now[1] - last[1]
        return round(100.0 * (total - idle) / total, 1)


def memory_used_mb() -> float | None:
    try:
        info: dict[str, int] = {}
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0])
        return round((info["MemTotal"] - info["MemAvailable"]) / 1024, 1)
    except (OSError, ValueError, KeyError, IndexError):
        return None


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


async def gpus(timeout: float = 5.0) -> list[GpuReport]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        proc = await asyncio.create_subprocess_exec(
            exe,
            "--query-gpu=index,name,utilization.gpu,memory.used,memory.total",
            "--format=csv,noheader,nounits",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except (OSError, asyncio.TimeoutError):
        return []
    reports = []
    for line in out.decode(errors="replace").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 5 or not parts[0].isdigit():
            continue
        reports.append(
            GpuReport(
                index=int(parts[0]),
                name=parts[1] or None,
                util=_num(parts[2]),
                mem_used_mb=_num(parts[3]),
                mem_total_mb=_num(parts[4]),
            )
        )
    return reports
