"""Where an authenticated proxied request spends its time in the gateway (py-spy).

Usage: ``python -m bench.profile [--seconds 10] [--connections 32]`` (needs ``py-spy`` in
the venv: ``.venv/bin/pip install py-spy``). Starts nginx and one gateway worker, logs in,
samples the worker with py-spy while wrk loads the 20 KB page, and prints the functions
with the most samples: *self* (the frame on top) and *total* (anywhere on the stack).
The collapsed stacks are kept in ``bench/results/profile.txt`` for a flame graph.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench import login
from bench.load import wrk
from bench.run import PAGES, serve_idp
from bench.servers import prepare_stack, start_gateway, start_upstream
from gateway.devidp import create_app as create_idp_app

OUT = Path(__file__).with_name("results") / "profile.txt"


def summarise(collapsed: str, top: int = 25) -> str:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        samples += n
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    lines = [f"{samples} samples"]
    for title, counter in (("self", own), ("total", total)):
        lines.append(f"\n-- {title} --")
        lines += [f"{n * 100 / samples:5.1f}%  {f}" for f, n in counter.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    """``func (path/to/module.py:12)`` → ``func (module.py)``: lines split one function."""
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rstrip(')').rsplit(':', 1)[0]).name})" if where else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    py_spy = Path(sys.executable).with_name("py-spy")
    if not py_spy.exists():
        sys.exit("py-spy is missing: .venv/bin/pip install py-spy")
    workdir = Path(tempfile.mkdtemp(prefix="gw-profile-"))
    workdir.chmod(0o755)
    upstream = start_upstream(workdir, dict(PAGES.values()))
    gateway = None
    try:
        stack, gw_port, idp_port = prepare_stack(workdir, upstream.port)
        serve_idp(create_idp_app(stack.idp), idp_port)
        gateway = start_gateway(workdir, gw_port, 1)
        path = PAGES["20k"][0]
        cookie = login.real_login(stack, path)
        url = stack.gateway_url + path
        wrk(url, 16, 2, {"Cookie": cookie})  # warm up
        raw = workdir / "stacks.txt"
        spy = subprocess.Popen([str(py_spy), "record", "-p", str(gateway.popen.pid), "-r", "250",
                                "-d", str(args.seconds), "-f", "raw", "-o", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = wrk(url, args.connections, args.seconds, {"Cookie": cookie})
        spy.wait(timeout=args.seconds + 30)
        collapsed = raw.read_text()
        OUT.parent.mkdir(exist_ok=True)
        OUT.write_text(collapsed)
        print(f"{result.rps:.0f} req/s under the profiler at c={args.connections}")
        print(summarise(collapsed))
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
