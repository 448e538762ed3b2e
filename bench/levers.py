"""Levers of the hot path, each measured on its own against what it would replace.

Usage: ``python -m bench.levers [--lever client|server|all|against|floor] [--against REV]
[--rounds 5] [--seconds 5]``.

One nginx upstream (the 20 KB page), a member signed in once through the dev IdP, and
two gateways started side by side on the same configuration and store, differing in one
thing; wrk (c=32, the session cookie) loads them in turns, ``--rounds`` times each, so
drift on a shared machine hits both alike. Reported per variant: the median req/s and
the median CPU µs per request (utime+stime of the server process tree over the run,
the steadier figure).

* ``client``: ``[proxy] client = "lean"`` against ``"aiohttp"`` (``sso-gateway serve``,
  one worker, as in production).
* ``server``: the same gateway ASGI app (``gateway.reload:app_from_env``, lean client)
  under uvicorn as ``serve`` runs it against Granian (``pip install granian``; ASGI
  interface, one worker, uvloop). Granian's own limits for the request head
  (``--http1-buffer-size``) and its read timeout (``--http1-header-read-timeout``) are
  set from ``[server]``, as near as Granian allows.
* ``against`` (not part of ``all``): the working tree's gateway (``now``) against the
  gateway as it was at git revision ``--against REV`` (default ``HEAD``; the variant is
  named by its short hash), both ``sso-gateway serve``, one worker. ``git archive REV``
  is unpacked into the run's temporary directory (no worktree to leave behind) and the
  second gateway imports its package from there (``PYTHONPATH``, checked before it
  starts); the working tree's configuration must be valid for REV too.
* ``floor`` (not part of ``all``): the gateway beside two bare Python proxies of the same
  page through the same upstream client with none of the gateway's work
  (``bench.floor``): an ASGI app under uvicorn (``asgi``) and an asyncio protocol writing
  to the socket itself (``raw``). The gaps are the gateway's own work and the ASGI
  server's.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench import login
from bench.load import wrk
from bench.run import PAGES, serve_idp, start_mellon_stack
from bench.servers import (
    Proc,
    _start,
    free_port,
    prepare_stack,
    start_gateway,
    start_upstream,
    wait_for_processes,
)
from gateway.config import load_settings
from gateway.devidp import create_app as create_idp_app

RESULTS = Path(__file__).with_name("results") / "levers.json"
REPO = Path(__file__).resolve().parent.parent
SEPARATE = ("against", "floor")  # levers kept under their own key, not part of "all"


def unpack_revision(rev: str, dest: Path) -> tuple[str, str]:
    """The tree of git revision ``rev`` unpacked into ``dest``; its full and short hash."""
    def git(*args: str) -> bytes:
        return subprocess.run(["git", "-C", str(REPO), *args], check=True,
                              capture_output=True).stdout

    try:
        full = git("rev-parse", "--verify", "--end-of-options", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        sys.exit(f"--against {rev}: not a commit of {REPO}")
    commit = full.decode().strip()
    with tarfile.open(fileobj=io.BytesIO(git("archive", commit))) as tar:
        tar.extractall(dest, filter="data")
    return commit, git("rev-parse", "--short", commit).decode().strip()


def start_revision(workdir: Path, checkout: Path, name: str, port: int) -> Proc:
    """``sso-gateway serve`` with the package imported from ``checkout``, on the working
    tree's configuration; exits with the reason if that is not the package imported or the
    configuration is not valid for that revision."""
    # The port as an override of ``listen``, not ``serve --port``, which older revisions lack.
    env = {**os.environ, "GATEWAY_LISTEN": f"127.0.0.1:{port}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout),
                                                       os.environ.get("PYTHONPATH")]))}
    found = subprocess.run([sys.executable, "-c", "import gateway; print(gateway.__file__)"],
                           env=env, cwd=workdir, capture_output=True, text=True)
    expected = checkout / "gateway" / "__init__.py"
    if found.returncode or Path(found.stdout.strip()) != expected:
        sys.exit(f"{name}: python imports gateway from {found.stdout.strip() or '?'}, "
                 f"not {expected}: {found.stderr.strip()}")
    print(f"{name}: gateway imported from {expected.parent}")
    exe = Path(sys.executable).with_name("sso-gateway")
    config = str(workdir / "gateway.toml")
    check = subprocess.run([str(exe), "check", "--config", config], env=env, cwd=workdir,
                           capture_output=True, text=True)
    if check.returncode:
        sys.exit(f"{name}: the working tree's configuration is not valid for this revision "
                 f"(a setting it does not know yet?):\n{check.stderr.strip()}")
    try:
        return _start(name, [str(exe), "serve", "--config", config, "--workers", "1"], port,
                      workdir, env=env)
    except RuntimeError:  # the log goes with the temporary directory: show its end now
        log = (workdir / f"{name}.log").read_text(errors="replace").strip().splitlines()
        sys.exit(f"{name} did not start; the end of its log:\n" + "\n".join(log[-15:]))


def start_floor(workdir: Path, kind: str, upstream_port: int, page: str,
                workers: int = 1) -> Proc:
    """A bare proxy of ``page`` (``bench.floor``): ``asgi`` or ``raw``, in ``workers``
    processes."""
    port = free_port()
    proc = _start(f"floor-{kind}", [sys.executable, "-m", "bench.floor", kind, str(port),
                                    str(upstream_port), page, str(workers)], port, workdir,
                  env={**os.environ, "PYTHONPATH": str(REPO)})
    if workers > 1:  # the parent listens before it forks the others
        wait_for_processes(proc, workers)
    return proc


def start_granian(workdir: Path, port: int) -> Proc:
    """The gateway's ASGI app (the same factory ``serve`` hands uvicorn) under Granian."""
    exe = Path(sys.executable).with_name("granian")
    if not exe.exists():
        sys.exit("granian is missing: .venv/bin/pip install granian")
    server = load_settings(workdir / "gateway.toml").server
    metrics = workdir / "granian-metrics"
    metrics.mkdir(exist_ok=True)
    env = {**os.environ, "GATEWAY_CONFIG": str(workdir / "gateway.toml"),
           "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
    args = [str(exe), "--interface", "asgi", "--factory", "gateway.reload:app_from_env",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--loop", "uvloop",
            "--no-ws", "--log-level", "warning", "--no-access-log",
            # [server] header_limit (hyper's read buffer is at least 8 KiB) and timeout
            "--http1-buffer-size", str(max(server.header_limit, 8192)),
            "--http1-header-read-timeout",
            str(min(max(int(server.header_timeout * 1000), 1), 60000))]
    return _start("granian", args, port, workdir, env=env)


def run_pair(procs: dict[str, Proc], page: str, headers: dict[str, str],
             rounds: int, seconds: float,
             own_headers: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """Each variant ``rounds`` times at c=32 on ``page``, in turns; medians per variant.
    Every variant is sent ``headers``, except those ``own_headers`` names."""
    urls = {name: f"http://127.0.0.1:{proc.port}{page}" for name, proc in procs.items()}
    sent = {name: (own_headers or {}).get(name, headers) for name in urls}
    for name, url in urls.items():  # each gives the member the page; then warm up
        answer = httpx.get(url, headers=sent[name], timeout=10)
        if answer.status_code != 200 or len(answer.content) != PAGES["20k"][1]:
            raise RuntimeError(f"{name}: {answer.status_code}, {len(answer.content)} bytes")
        wrk(url, 16, 2, sent[name])
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in urls}
    for _ in range(rounds):
        for name, url in urls.items():
            proc = procs[name]
            cpu = proc.cpu_seconds()
            result = wrk(url, 32, seconds, sent[name])
            if result.errors:
                raise RuntimeError(f"{result.errors} failed requests to {name}")
            used = (proc.cpu_seconds() - cpu) * 1e6 / max(result.requests, 1)
            runs[name].append((result.rps, used))
            print(f"  {name:<10} {result.rps:>8.0f} req/s  {used:>6.0f} µs CPU/req  "
                  f"p99 {result.p99_ms:.1f} ms", flush=True)
    return {name: {"rps_median": round(statistics.median(r for r, _ in rows)),
                   "cpu_us_per_req_median": round(statistics.median(c for _, c in rows), 1),
                   "runs": [[round(r), round(c, 1)] for r, c in rows]}
            for name, rows in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lever", choices=["client", "server", "all", "against", "floor"],
                        default="all")
    parser.add_argument("--against", metavar="REV",
                        help="git revision for --lever against (default HEAD)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes of the gateway and the bare proxies (--lever floor)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if args.against is not None and args.lever != "against":
        parser.error("--against goes with --lever against")
    if args.workers != 1 and args.lever != "floor":
        parser.error("--workers goes with --lever floor")
    # SIGTERM as well as Ctrl-C: stop the servers and remove the temporary directory.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="gw-levers-"))
    workdir.chmod(0o755)
    procs: list[Proc] = []
    report: dict[str, Any] = {"loadavg_at_start": os.getloadavg(), "rounds": args.rounds,
                              "seconds_per_run": args.seconds}
    try:
        if args.lever == "against":  # a revision that does not exist fails before any server
            commit, short = unpack_revision(args.against or "HEAD", workdir / "checkout")
        upstream = start_upstream(workdir, dict(PAGES.values()))
        procs.append(upstream)
        stack, gw_port, idp_port = prepare_stack(workdir, upstream.port)
        idp = serve_idp(create_idp_app(stack.idp), idp_port)
        page = PAGES["20k"][0]
        main_gw = start_gateway(workdir, gw_port, args.workers, name="gateway-lean")
        procs.append(main_gw)
        cookie = login.real_login(stack, page)
        # Every gateway is asked for the public host, whatever port it listens on.
        headers = {"Cookie": cookie, "Host": f"127.0.0.1:{gw_port}"}
        if args.lever in ("client", "all"):
            other_port = free_port()
            other = start_gateway(workdir, other_port, 1, name="gateway-aiohttp",
                                  env={"GATEWAY_PROXY__CLIENT": "aiohttp"})
            procs.append(other)
            print("client lever: [proxy] client, sso-gateway serve, 1 worker, 20 KB, c=32")
            report["client"] = run_pair({"lean": main_gw, "aiohttp": other}, page, headers,
                                        args.rounds, args.seconds)
            other.stop()
        if args.lever in ("server", "all"):
            granian_port = free_port()
            granian = start_granian(workdir, granian_port)
            procs.append(granian)
            print("server lever: uvicorn (serve) against Granian, 1 worker, 20 KB, c=32")
            report["server"] = run_pair({"uvicorn": main_gw, "granian": granian}, page,
                                        headers, args.rounds, args.seconds)
        if args.lever == "against":
            rev_port = free_port()
            at_rev = start_revision(workdir, workdir / "checkout", f"gateway-{short}",
                                    rev_port)
            procs.append(at_rev)
            print(f"against: the working tree (now) against {short} ({commit}), "
                  "sso-gateway serve, 1 worker, 20 KB, c=32")
            report = {"revision": short, "commit": commit, **report, **run_pair(
                {"now": main_gw, short: at_rev}, page, headers, args.rounds, args.seconds)}
        if args.lever == "floor":
            bare = {kind: start_floor(workdir, kind, upstream.port, page, args.workers)
                    for kind in ("asgi", "raw")}
            procs.extend(bare.values())
            mellon, mellon_idp = start_mellon_stack(workdir, stack, upstream.port)
            procs.append(mellon)
            mellon_cookie = login.mellon_login(f"http://127.0.0.1:{mellon.port}", page)
            mellon_idp.should_exit = True
            print(f"floor: the gateway (serve) against bare Python proxies of the same page "
                  f"and Apache with mod_auth_mellon, {args.workers} worker(s), 20 KB, c=32")
            report = {**report, "workers": args.workers, **run_pair(
                {"gateway": main_gw, **bare, "mellon": mellon}, page, headers, args.rounds,
                args.seconds, own_headers={"mellon": {"Cookie": mellon_cookie}})}
        idp.should_exit = True
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    report["loadavg_at_end"] = os.getloadavg()
    # The file keeps the last client/server run (top level) and, under "against", "floor"
    # (one worker) and "floor_<N>w", the last such run with its own rounds and load; a run
    # replaces only its part.
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    key = args.lever if args.workers == 1 else f"{args.lever}_{args.workers}w"
    if args.lever in SEPARATE:
        report = {**previous, key: report}
    else:
        report.update({k: v for k, v in previous.items()
                       if k.startswith(SEPARATE) and isinstance(v, dict)})
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    levers = (key,) if args.lever in SEPARATE else ("client", "server")
    for lever in levers:
        for name, row in report.get(lever, {}).items():
            if isinstance(row, dict):  # a variant (not the revision or the load)
                print(f"{lever:<8} {name:<8} median {row['rps_median']:>6} req/s, "
                      f"{row['cpu_us_per_req_median']:>6} µs CPU/req")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
