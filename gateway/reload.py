"""Live reload: the application ``serve`` runs is a ``LiveGateway``, a small ASGI holder
that points at the current ``Gateway``. SIGHUP (``sso-gateway reload``, systemd's
``ExecReload``) makes it read the configuration files again and take them into use in
this process, without dropping a request:

1. ``gateway.toml`` is loaded and validated as ``check`` does (rules, IdP metadata
   files, SP keys with the rollover pair, identity-token keys, session secrets), and
   the TLS certificate and key, if the gateway serves TLS, are loaded into a scratch
   context;
2. a new ``Gateway`` is built from it and started (its own store connections, upstream
   pool, metadata refreshers, purge timer);
3. the pointer is swapped: requests that arrive from now on go to the new gateway, and
   the live TLS context gets the new certificate for new handshakes;
4. the old gateway is closed once the requests it is serving have finished (at most
   ``[server] shutdown_timeout`` seconds; then it is closed under them).

When any step before the swap fails, the reload is refused: the reasons are logged, the
old gateway keeps serving, nothing it holds is touched. Settings the running server was
started with — ``listen``, ``public_url``, ``trusted_proxies``, ``[logging] format`` and
``[server]`` apart from the TLS file names, and turning TLS on or off — cannot change
live: a configuration that changes them is refused with "needs a restart".

Every reload is audited (``config_reload``, ``trigger`` "reload", ``result`` "ok" or
"refused" with the ``reason``), counted (``gateway_config_reloads_total{result}``) and
shown by ``/readyz`` (``gateway.config_state``). Reloads run one at a time; signals that
arrive during one make one more afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from starlette.types import Receive, Scope, Send

from gateway.app import Gateway
from gateway.audit import audit
from gateway.config import ServerSettings, Settings, load_settings
from gateway.config_state import ConfigState, Reload, file_sha256, fingerprint
from gateway.errors import ConfigError
from gateway.tls import live, load_pair, new_context, tls_files
from gateway.version import VERSION

log = logging.getLogger("gateway.reload")

#: ``[server]`` settings a reload may change: the TLS files are read again.
LIVE_SERVER_KEYS = frozenset({"tls_cert_file", "tls_key_file", "tls_key_password_file"})


def needs_restart(old: Settings, new: Settings) -> list[str]:
    """The changes from ``old`` to ``new`` that the running server cannot take live."""
    problems = [f"{key} changed: needs a restart" for key in
                ("listen", "public_url", "trusted_proxies")
                if getattr(old, key) != getattr(new, key)]
    for key in ServerSettings.model_fields:
        if key not in LIVE_SERVER_KEYS and getattr(old.server, key) != getattr(new.server, key):
            problems.append(f"[server] {key} changed: needs a restart")
    if (old.server.tls_cert_file is None) != (new.server.tls_cert_file is None):
        problems.append("[server] tls_cert_file: turning TLS on or off needs a restart")
    if old.logging.format != new.logging.format:
        problems.append("[logging] format changed: needs a restart")
    return problems


class _Running:
    """A started gateway and the requests it is serving."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self._stack = contextlib.AsyncExitStack()

    async def start(self, trigger: str) -> None:
        await self._stack.enter_async_context(self.gateway.running(trigger))

    async def stop(self) -> None:
        await self._stack.aclose()


class LiveGateway:
    """The ASGI application of ``serve``: every request goes to the current ``Gateway``;
    ``reload()`` replaces it. ``handle_signals`` makes SIGHUP call ``reload``."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time,
                 handle_signals: bool = False) -> None:
        self.source = Path(settings.source)
        self.clock = clock
        first = Gateway(settings, clock=clock)
        self.state: ConfigState = first.config_state
        self._current = _Running(first)
        self._retiring: set[asyncio.Task[None]] = set()
        self._old: set[_Running] = set()  # swapped out, not yet closed
        self._task: asyncio.Task[None] | None = None
        self._wanted = False
        self._signals = handle_signals and threading.current_thread() is threading.main_thread()
        if self._signals:  # until the event loop takes over: remember, do not die
            signal.signal(signal.SIGHUP, self._early_hup)

    @property
    def gateway(self) -> Gateway:
        """The gateway serving new requests now."""
        return self._current.gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        running = self._current
        running.inflight += 1
        running.idle.clear()
        try:
            await running.gateway(scope, receive, send)
        finally:
            running.inflight -= 1
            if not running.inflight:
                running.idle.set()

    # -- reload ---------------------------------------------------------------------------

    def request_reload(self) -> None:
        """Reload soon (a signal handler): one reload at a time, and one more after the
        current one when asked again meanwhile."""
        self._wanted = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._reload_while_wanted())

    async def _reload_while_wanted(self) -> None:
        while self._wanted:
            self._wanted = False
            await self.reload()

    async def reload(self) -> Reload:
        """Read the configuration again and serve it, or refuse it and keep the old one."""
        now = self.clock()
        log.info("reloading %s", self.source)
        try:
            settings = await asyncio.to_thread(load_settings, self.source)
        except ConfigError as exc:
            return self._refused(now, file_sha256(self.source), list(exc.problems))
        sha256 = await asyncio.to_thread(fingerprint, settings)
        problems = needs_restart(self.gateway.settings, settings)
        if problems:
            return self._refused(now, sha256, problems)
        try:
            files = tls_files(settings)
            if files is not None:
                await asyncio.to_thread(load_pair, new_context(), files)
            # Built in a thread: reading keys (RSA checks) and metadata takes a while.
            gateway = await asyncio.to_thread(Gateway, settings, clock=self.clock,
                                              config_state=self.state)
            running = _Running(gateway)
            await running.start("reload")
        except ConfigError as exc:
            return self._refused(now, sha256, list(exc.problems))
        except Exception as exc:  # whatever a start can raise: the old gateway stays
            log.exception("reload of %s failed", self.source)
            return self._refused(now, sha256, [f"{type(exc).__name__}: {exc}"])
        server_tls = live()
        if files is not None and server_tls is not None:
            try:
                server_tls.reload(files)
            except ConfigError as exc:  # replaced again since the check
                await running.stop()
                return self._refused(now, sha256, list(exc.problems))
        old, self._current = self._current, running
        self._old.add(old)
        outcome = Reload(now, "ok", running.gateway.config_sha256)
        self.state.reloaded(outcome)
        running.gateway.telemetry.metrics.reloads.labels("ok").inc()
        log.info("reloaded %s: config_sha256 %s", self.source, outcome.sha256)
        task = asyncio.get_running_loop().create_task(self._retire(old))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return outcome

    def _refused(self, now: float, sha256: str, problems: list[str]) -> Reload:
        outcome = Reload(now, "refused", sha256, tuple(problems))
        self.state.reloaded(outcome)
        self.gateway.telemetry.metrics.reloads.labels("refused").inc()
        log.error("reload of %s refused, the previous configuration keeps serving: %s",
                  self.source, "; ".join(problems))
        audit("config_reload", trigger="reload", result="refused", config=str(self.source),
              config_sha256=sha256, reason="; ".join(problems)[:2000], version=VERSION)
        return outcome

    async def _retire(self, old: _Running) -> None:
        """Close ``old`` once its requests are done (or cut them after the timeout)."""
        timeout = old.gateway.settings.server.shutdown_timeout
        try:
            await asyncio.wait_for(old.idle.wait(), timeout)
        except TimeoutError:
            log.warning("%d requests of the previous configuration still running after %g s "
                        "([server] shutdown_timeout): closing it under them", old.inflight,
                        timeout)
        await self._stop(old)

    async def _stop(self, old: _Running) -> None:
        self._old.discard(old)
        try:
            await old.stop()
        except Exception:
            log.exception("closing the previous configuration's gateway failed")

    # -- lifespan -------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            await self._current.start("startup")
        except ConfigError as exc:
            log.error("cannot start: %s", "; ".join(exc.problems))
            await send({"type": "lifespan.startup.failed", "message": "; ".join(exc.problems)})
            return
        except Exception as exc:
            log.exception("cannot start")
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            return
        loop = asyncio.get_running_loop()
        if self._signals:
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
            if self._wanted:
                self.request_reload()
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        if self._signals:  # shutting down: a late SIGHUP changes nothing, ends nothing
            loop.remove_signal_handler(signal.SIGHUP)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        await self.close()
        await send({"type": "lifespan.shutdown.complete"})

    async def close(self) -> None:
        """Stop reloading and close every gateway (requests are done by now)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._retiring):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for old in list(self._old):
            await self._stop(old)
        await self._current.stop()

    def _early_hup(self, _sig: int, _frame: object) -> None:
        self._wanted = True


def app_from_env() -> LiveGateway:
    """The uvicorn factory for ``serve``: config from ``$GATEWAY_CONFIG``, reloaded on
    SIGHUP."""
    from uvicorn.config import STARTUP_FAILURE

    from gateway.logs import configure_logging

    try:
        settings = load_settings()
        configure_logging(settings.logging.format or "json")  # in every worker process
        return LiveGateway(settings, handle_signals=True)
    except ConfigError as exc:  # a worker started while the files do not load
        for problem in exc.problems:
            log.error("cannot start: %s", problem)
        sys.exit(STARTUP_FAILURE)
