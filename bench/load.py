"""Driving load with wrk and reading its report."""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_PERCENTILE = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$", re.M)


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # socket errors plus answers other than 2xx/3xx

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def wrk(url: str, connections: int, seconds: float, headers: dict[str, str] | None = None,
        threads: int = 1) -> Result:
    """One wrk run; one thread is plenty on 2 cores and leaves the other to the server."""
    duration = max(1, round(seconds))  # wrk takes whole seconds
    args = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{duration}s",
            "--latency", "--timeout", "10s"]
    for name, value in (headers or {}).items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    return parse(out)


def parse(report: str) -> Result:
    rps = float(_find(r"Requests/sec:\s+([\d.]+)", report))
    requests = int(_find(r"(\d+) requests in", report))
    percentiles = {p: float(v) * _UNITS[u] for p, v, u in _PERCENTILE.findall(report)}
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", report))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", report)
    errors += int(non_2xx.group(1)) if non_2xx else 0
    return Result(rps, percentiles["50"], percentiles["99"], requests, errors)


def _find(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"unexpected wrk output:\n{text}")
    return match.group(1)
