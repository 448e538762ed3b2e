"""``make bench``: the gateway against a direct upstream, Apache httpd and Apache with
mod_auth_mellon, in one run.

Usage: ``python -m bench.run [--seconds 5] [--workers N]``. Everything runs on loopback
in a temporary directory: nginx serves the pages; Apache (mod_proxy_http), Apache with
mod_auth_mellon (signed in through a dev IdP of its own) and the gateway
(``sso-gateway serve``) proxy to it; wrk drives the load. Prints a table and writes
``bench/results/latest.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from bench import login, memory
from bench.load import Result, wrk
from bench.servers import (
    Proc,
    free_port,
    prepare_mellon,
    prepare_stack,
    start_apache,
    start_edge,
    start_gateway,
    start_mellon,
    start_upstream,
)
from gateway.demo.stack import DemoStack
from gateway.devidp import create_app as create_idp_app
from gateway.devidp.metadata import idp_metadata

PAGES = {"20k": ("/issues/page-20k.html", 20 * 1024), "1m": ("/issues/page-1m.html", 1 << 20)}
SMALL = ("/issues/small.html", 1024)
CONCURRENCY = {"20k": (1, 16, 32, 64), "1m": (1, 32)}
LOGINS = 500
RESULTS = Path(__file__).with_name("results") / "latest.json"


class PeakRSS:
    """Samples a process tree's RSS in the background; ``peak`` is the highest seen."""

    def __init__(self, proc: Proc) -> None:
        self.proc, self.peak, self._stop = proc, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.peak = max(self.peak, self.proc.rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


class Group:
    """Processes measured as one (the edge mode: nginx and the gateway it asks)."""

    def __init__(self, *procs: Proc) -> None:
        self.procs = procs

    def cpu_seconds(self) -> float:
        return sum(p.cpu_seconds() for p in self.procs)


def measure(proc: Proc | Group, url: str, c: int, seconds: float,
            headers: dict[str, str] | None = None) -> dict[str, float | int]:
    """One wrk run, plus the server's CPU time per request over the run."""
    cpu = proc.cpu_seconds()
    result: Result = wrk(url, c, seconds, headers)
    if result.errors:
        raise RuntimeError(f"{result.errors} failed requests to {url} at c={c}: see the logs")
    row = result.as_dict()
    row["cpu_us_per_req"] = round((proc.cpu_seconds() - cpu) * 1e6 / max(result.requests, 1), 1)
    return row


def machine() -> dict[str, object]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in
                Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
               platform.processor())
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "loadavg_at_start": os.getloadavg()}


def serve_idp(app: ASGIApp, port: int) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server


def start_mellon_stack(workdir: Path, stack: DemoStack,
                       upstream_port: int) -> tuple[Proc, uvicorn.Server]:
    """Apache with mod_auth_mellon in front of the upstream, and a dev IdP of its own that
    knows it as its SP (served in this process until ``should_exit``)."""
    sp = prepare_mellon(workdir)
    idp_port = free_port()
    idp = replace(stack.idp, base_url=f"http://127.0.0.1:{idp_port}", entity_id="",
                  sp_entity_id=sp.entity_id, sp_acs_url=sp.acs_url, sp_sls_url="",
                  sp_cert_pem=sp.cert_pem, require_signed_requests=False)
    server = serve_idp(create_idp_app(idp), idp_port)
    return start_mellon(workdir, sp, upstream_port, idp_metadata(idp)), server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per wrk run")
    parser.add_argument("--workers", type=int, default=0,
                        help="gateway workers (default: measure 1 and 2, keep the faster)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--quick", action="store_true",
                        help="only c=32, no login or memory runs (for trying changes)")
    args = parser.parse_args()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    workdir.chmod(0o755)  # nginx workers read the pages as an unprivileged user
    procs: list[Proc] = []
    report: dict[str, Any] = {"machine": machine(), "seconds_per_run": args.seconds}
    try:
        upstream = start_upstream(workdir, dict([*PAGES.values(), SMALL]))
        procs.append(upstream)
        stack, gw_port, idp_port = prepare_stack(workdir, upstream.port)
        edge_port = free_port()
        config = workdir / "gateway.toml"  # the edge mode's nginx is one more public host
        config.write_text(f'allowed_hosts = ["127.0.0.1:{edge_port}"]\n' + config.read_text())
        idp = serve_idp(create_idp_app(stack.idp), idp_port)
        apache = start_apache(workdir, upstream.port)
        procs.append(apache)
        mellon, idp_for_mellon = start_mellon_stack(workdir, stack, upstream.port)
        procs.append(mellon)
        base = {"direct": f"http://127.0.0.1:{upstream.port}",
                "apache": f"http://127.0.0.1:{apache.port}",
                "mellon": f"http://127.0.0.1:{mellon.port}", "gateway": stack.gateway_url}
        page20 = PAGES["20k"][0]
        mellon_cookie = login.mellon_login(base["mellon"], page20)

        # Workers: 1 against 2 on the case the target is about, then keep the faster.
        cookie = ""
        by_workers: dict[int, dict[str, float | int]] = {}
        gateway: Proc | None = None
        for workers in [args.workers] if args.workers else [1, 2]:
            if gateway is not None:
                gateway.stop()
            gateway = start_gateway(workdir, gw_port, workers)
            procs.append(gateway)
            cookie = cookie or login.real_login(stack, page20)
            wrk(base["gateway"] + page20, 16, 1, {"Cookie": cookie})  # warm up
            by_workers[workers] = measure(gateway, base["gateway"] + page20, 32, args.seconds,
                                          {"Cookie": cookie})
            if not args.quick:  # logins on one process (the baseline), then on every worker
                logins = login.acs_throughput(stack, gateway, LOGINS, page20)
                report["login_one_process" if workers == 1 else "login"] = {
                    **logins, "workers": workers}
        best = max(by_workers, key=lambda w: by_workers[w]["rps"])
        assert gateway is not None
        if len(by_workers) > 1 and best != 2:
            gateway.stop()
            gateway = start_gateway(workdir, gw_port, best)
            procs.append(gateway)
        report["workers"] = {"used": best, "auth_20k_c32_by_workers": by_workers}
        time.sleep(1)
        rss_idle = gateway.rss_bytes()
        edge = start_edge(workdir, edge_port, gw_port)
        procs.append(edge)
        base["edge"] = f"http://127.0.0.1:{edge_port}"

        targets: dict[str, tuple[Proc | Group, dict[str, str]]] = {
                   "direct": (upstream, {}), "apache": (apache, {}),
                   "mellon": (mellon, {"Cookie": mellon_cookie}),
                   "gateway": (gateway, {"Cookie": cookie}), "anonymous": (gateway, {}),
                   "edge": (Group(edge, gateway), {"Cookie": cookie})}
        for name, (_, headers) in targets.items():  # warm up every path
            base_url = base["gateway" if name == "anonymous" else name]
            wrk(base_url + page20, 16, 1, headers)
        rows = []
        peak = PeakRSS(gateway)
        plan = {"20k": (32,), "1m": (32,)} if args.quick else CONCURRENCY
        for page, (path, _) in PAGES.items():
            for c in plan.get(page, ()):
                for name, (proc, headers) in targets.items():
                    if name == "anonymous" and page != "20k":
                        continue
                    url = base["gateway" if name == "anonymous" else name] + path
                    row = {"page": page, "c": c, "case": name,
                           **measure(proc, url, c, args.seconds, headers)}
                    rows.append(row)
                    print(_line(row), flush=True)
        rss_load = peak.stop()
        _add_ratios(rows)
        report["results"] = rows
        c32 = {r["case"]: r for r in rows if r["page"] == "20k" and r["c"] == 32}
        report["ratio_gateway_apache_c32"] = c32["gateway"]["ratio_apache"]
        report["ratio_gateway_direct_c32"] = c32["gateway"]["ratio_direct"]
        report["ratio_gateway_mellon_c32"] = c32["gateway"]["ratio_mellon"]
        report["ratio_mellon_apache_c32"] = c32["mellon"]["ratio_apache"]
        report["ratio_edge_mellon_c32"] = c32["edge"]["ratio_mellon"]
        if args.quick:
            print(f"gateway/apache at c=32: {report['ratio_gateway_apache_c32']:.2f}, "
                  f"gateway/mellon: {report['ratio_gateway_mellon_c32']:.2f}, "
                  f"edge/mellon: {report['ratio_edge_mellon_c32']:.2f}")
            return

        if "login" not in report:  # only one worker count was asked for
            report["login"] = {**login.acs_throughput(stack, gateway, LOGINS, page20),
                               "workers": best}
        if "login_one_process" in report:
            report["ratio_acs_workers_one_process"] = round(
                report["login"]["acs_per_s"] / report["login_one_process"]["acs_per_s"], 2)
        mem: dict[str, Any] = {"gateway_rss_idle_bytes": rss_idle,
                                  "gateway_rss_load_peak_bytes": rss_load}
        mem["gateway_rss_growth_per_10k_used_sessions_bytes"] = memory.gateway_sessions_rss(
            stack, gateway, base["gateway"] + SMALL[0])
        mem.update(memory.store_memory(workdir))
        report["memory"] = mem
        report["targets"] = {
            "ratio_gateway_apache_c32": {"want": 0.75, "got": report["ratio_gateway_apache_c32"]},
            "ratio_gateway_mellon_c32": {"want": 1.0, "got": report["ratio_gateway_mellon_c32"]},
            "ratio_edge_mellon_c32": {"want": 1.5, "got": report["ratio_edge_mellon_c32"]},
            "acs_per_s": {"want": 300, "got": report["login"]["acs_per_s"]},
            "ratio_acs_workers_one_process": {
                "want": 1.8, "got": report.get("ratio_acs_workers_one_process")},
        }
        idp.should_exit = True
        idp_for_mellon.should_exit = True
    finally:
        for proc in reversed(procs):
            proc.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    print(f"\nwritten to {RESULTS} in {report['elapsed_s']} s")


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    ref = {(r["page"], r["c"], r["case"]): float(r["rps"]) for r in rows}
    for r in rows:
        for other in ("direct", "apache", "mellon"):
            r[f"ratio_{other}"] = round(float(r["rps"]) / ref[(r["page"], r["c"], other)], 3)


def _line(row: dict[str, Any]) -> str:
    return (f"{row['page']:>4} c={row['c']:<3} {row['case']:<10} {row['rps']:>9.0f} req/s  "
            f"p50 {row['p50_ms']:>7.2f} ms  p99 {row['p99_ms']:>7.2f} ms  "
            f"cpu {row['cpu_us_per_req']:>6.0f} us/req  errors {row['errors']}")


def summary(report: dict[str, Any]) -> str:
    head = (f"{'page':>4} {'c':>3}  {'case':<10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'cpu us/req':>10} {'/direct':>8} {'/apache':>8} {'/mellon':>8}")
    lines = ["", head, "-" * len(head)]
    for r in report["results"]:
        lines.append(f"{r['page']:>4} {r['c']:>3}  {r['case']:<10} {r['rps']:>8.0f} "
                     f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['cpu_us_per_req']:>10.0f} "
                     f"{r['ratio_direct']:>8.2f} {r['ratio_apache']:>8.2f} "
                     f"{r['ratio_mellon']:>8.2f}")
    w = report["workers"]
    lines.append("")
    tried = ", ".join(f"{k}: {v['rps']:.0f}" for k, v in w["auth_20k_c32_by_workers"].items())
    lines.append(f"gateway workers: {w['used']} (auth 20k c=32 req/s by workers: {tried})")
    lines.append(f"ratio gateway/apache at c=32 (20 KB, authenticated): "
                 f"{report['ratio_gateway_apache_c32']:.2f}  (target >= 0.75)")
    lines.append(f"ratio gateway/mellon at c=32 (Apache + mod_auth_mellon, both signed in): "
                 f"{report['ratio_gateway_mellon_c32']:.2f}  (target >= 1.0)")
    lines.append(f"ratio edge/mellon at c=32 (nginx asks the gateway, answers cached 1 s): "
                 f"{report['ratio_edge_mellon_c32']:.2f}  (target >= 1.5)")
    lg = report["login"]
    if "ratio_acs_workers_one_process" in report:
        one = report["login_one_process"]["acs_per_s"]
        lines.append(f"logins on {lg['workers']} worker(s) against one process: "
                     f"{report['ratio_acs_workers_one_process']:.2f} x ({one:.0f} ACS posts/s "
                     f"in one process; target >= 1.8)")
    lines.append(f"logins: {lg['acs_per_s']:.0f} ACS posts/s (target >= 300), "
                 f"CPU {lg['acs_cpu_ms']:.1f} ms per ACS + {lg['start_cpu_ms']:.1f} ms per "
                 f"AuthnRequest, {lg['logins']} logins at c={lg['concurrency']}")
    m = report["memory"]
    mib = 1 << 20
    lines.append(f"memory: gateway RSS idle {m['gateway_rss_idle_bytes'] / mib:.0f} MiB, "
                 f"under load {m['gateway_rss_load_peak_bytes'] / mib:.0f} MiB, "
                 f"+{m['gateway_rss_growth_per_10k_used_sessions_bytes'] / mib:.1f} MiB "
                 f"after 10,000 sessions were used")
    lines.append(f"        per 10,000 stored sessions: SQLite "
                 f"{m['sqlite_file_bytes_per_10k'] / mib:.1f} MiB on disk, Redis "
                 + (f"{m['redis_used_memory_bytes_per_10k'] / mib:.1f} MiB"
                    if "redis_used_memory_bytes_per_10k" in m else m["redis_note"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
