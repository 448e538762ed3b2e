"""Redis store: sessions, keys and records shared by several gateway replicas.

URLs: ``redis://[user:password@]host:port/db``, ``rediss://…`` (TLS), and Sentinel as
``redis+sentinel://[user:password@]host:port[,host:port…]/service_name[/db]`` (the
credentials are the data nodes'; the sentinels are asked without them). Valkey works
too. Redis Cluster does not: the scripts below touch several keys of one session.

Keys, all under ``key_prefix`` (default ``gw:``), all but the last expiring on their own:

* ``session:<key>``  a hash per session, expiring at the session's absolute end;
* ``sessions``, ``subject:<sha256(subject)>``, ``logout:<sha256(logout handle)>``  sorted
  sets of session keys scored by expiry — indexes for listing, revocation and logout
  without a scan; pruned on every write and expiring with their last member;
* ``once:<key>``  single-use keys and expiring records (pending sign-ins, the replay
  cache, login failures), ``"<expiry>\\n<value>"``; ``count:<key>:<window>`` counters;
* ``index:<prefix>``  a sorted set of the live keys of a counted prefix (pending
  sign-ins, ``COUNTED``), scored by their end: ``count_keys`` is one ``ZCOUNT``, not a
  scan plus a read per key; pruned on every add and by the purge;
* ``purge-lock``  held (with a TTL) while one replica purges, so replicas take turns;
* ``changes``  a stream of the keys of deleted and touched sessions (capped at about
  ``CHANGES_KEPT`` entries), written by the same script that deletes or touches: what
  replicas that keep sessions in memory read (``changed_since``);
* ``registrations``  a list of e-mail registrations: records, the one key that does not
  expire (persist Redis, or back it up, if you use them).

Every multi-key change is one Lua script, so it is atomic and the indexes never
disagree with the sessions. Expiry is decided by the gateway's clock (the value
carries its end) and enforced by Redis with a relative TTL, which is immune to clock
skew between the gateway and Redis hosts. Every Redis failure becomes ``StoreError``.
A session hash written by a version before subjects (no ``subject`` field) reads as
absent: its member signs in again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from gateway.errors import StoreError
from gateway.sessions.store import (
    Clock,
    Namespace,
    Registration,
    StoredSession,
    registration_criterion,
)

#: Key prefixes whose live keys are counted (a gauge): each has an index sorted set.
COUNTED = (str(Namespace.LOGIN_STATE),)
#: Entries the change stream keeps (about: trimmed with ``MAXLEN ~``).
CHANGES_KEPT = 20_000
#: Changes one ``changed_since`` returns at most (more: the reader forgets all).
CHANGES_READ = 5_000
#: Seconds a purge holds ``purge-lock`` at most (one replica purges at a time).
PURGE_LOCK_SECONDS = 120
HEARTBEAT_TTL_MS = 60_000

# KEYS: session, all-index, subject-index[, logout-index]
# ARGV: session key, expiry score, now, ttl ms, then hash field/value pairs
_PUT = """
local old = redis.call('HMGET', KEYS[1], 'si', 'li')
for _, idx in ipairs(old) do if idx then redis.call('ZREM', idx, ARGV[1]) end end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
for i = 2, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[3])
  redis.call('ZADD', KEYS[i], ARGV[2], ARGV[1])
  local top = redis.call('ZRANGE', KEYS[i], -1, -1, 'WITHSCORES')
  local ms = math.ceil((tonumber(top[2]) - tonumber(ARGV[3])) * 1000)
  redis.call('PEXPIRE', KEYS[i], string.format('%d', math.max(ms, 1)))
end
"""

# KEYS: session, all-index, changes; ARGV: session key, changes kept. Returns 1 if the
# session existed (and then logs it in the change stream).
_DELETE = """
local idx = redis.call('HMGET', KEYS[1], 'si', 'li')
redis.call('ZREM', KEYS[2], ARGV[1])
for _, k in ipairs(idx) do if k then redis.call('ZREM', k, ARGV[1]) end end
local gone = redis.call('DEL', KEYS[1])
if gone == 1 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'k', ARGV[1])
end
return gone
"""

# KEYS: session; ARGV: last_seen. Never creates a hash without a TTL.
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'last_seen', ARGV[1])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'k', ARGV[2])
end
"""

# KEYS: once key[, index]; ARGV: encoded value, now, ttl ms[, member, end]. SET NX PX, with
# the expiry the gateway's clock decides (a value whose end has passed is replaced). With an
# index, the key also joins its prefix's index (pruned of what has ended; the index lives as
# long as its longest-lived member).
_ADD_ONCE = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local ends = tonumber(string.match(cur, '^([^\\n]*)'))
  if ends and ends > tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
if KEYS[2] then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
  if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[3]) then
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
  end
end
return 1
"""

# KEYS: once key; ARGV: now. Delete only a value whose end has passed (purge).
_DROP_EXPIRED = """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ends = tonumber(string.match(cur, '^([^\\n]*)'))
if ends and ends > tonumber(ARGV[1]) then return 0 end
return redis.call('DEL', KEYS[1])
"""

# KEYS: the registrations list; ARGV: criterion ("email"/"subject"/"before"), its value.
# Removes the matching entries in one step and returns them.
_DELETE_REGISTRATIONS = """
local gone = {}
for _, entry in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local ok, r = pcall(cjson.decode, entry)
  if ok then
    local hit
    if ARGV[1] == 'email' then hit = string.lower(tostring(r[1])) == ARGV[2]
    elseif ARGV[1] == 'subject' then hit = r[4] == ARGV[2]
    else hit = tonumber(r[2]) < tonumber(ARGV[2]) end
    if hit then
      redis.call('LREM', KEYS[1], 1, entry)
      table.insert(gone, entry)
    end
  end
end
return gone
"""

_FIELDS = ("subject", "logout_handle", "principal", "created", "last_seen", "expires",
           "user_agent", "client_ip")


class RedisStore:
    """A ``Backend`` (sessions, keys, records) in one Redis database, under one key prefix."""

    def __init__(self, url: str, clock: Clock, *, key_prefix: str = "gw:", pool_size: int = 32,
                 connect_timeout: float = 2.0, socket_timeout: float = 2.0) -> None:
        self.url = url
        self._clock = clock
        self._p = key_prefix
        self._options: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout, "socket_timeout": socket_timeout,
            "max_connections": pool_size, "decode_responses": True,
            # One quick retry rides over a dropped connection; a Redis that is down
            # fails fast (503) and the pool reconnects on its own once it is back.
            "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
        }
        self._pool_timeout = connect_timeout
        self._client: Redis | None = None
        self._sentinel: Sentinel | None = None

    async def open(self) -> None:
        """Build the client; connections are made on first use, so Redis may be down now."""
        if self._client is not None:
            return
        if self.url.startswith("redis+sentinel://"):
            hosts, service, db, creds = parse_sentinel_url(self.url)
            self._sentinel = Sentinel(
                hosts, **{k: v for k, v in self._options.items() if k.startswith("socket_")})
            options: dict[str, Any] = {**self._options, **creds, "db": db}
            self._client = self._sentinel.master_for(service, **options)
        else:
            try:
                pool = BlockingConnectionPool.from_url(self.url, timeout=self._pool_timeout,
                                                       **self._options)
            except ValueError as exc:
                raise StoreError(f"bad Redis store URL: {exc}") from exc
            self._client = Redis.from_pool(pool)
        self._put, self._delete, self._touch, self._add_once, self._drop = (
            self._client.register_script(lua)
            for lua in (_PUT, _DELETE, _TOUCH, _ADD_ONCE, _DROP_EXPIRED))
        self._delete_registrations = self._client.register_script(_DELETE_REGISTRATIONS)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._sentinel is not None:
            for node in self._sentinel.sentinels:
                await node.aclose()
            self._sentinel = None

    @property
    def redis(self) -> Redis:
        if self._client is None:
            raise StoreError("the Redis store is not open")
        return self._client

    @contextlib.contextmanager
    def _errors(self, operation: str) -> Iterator[None]:
        try:
            yield
        except MasterNotFoundError as exc:  # its message is a page of client repr
            raise StoreError(f"Redis store: {operation} failed: the sentinels name no "
                             f"reachable master (unreachable, or not monitoring it)") from exc
        except (RedisError, OSError) as exc:
            reason = str(exc).splitlines()[0][:300] if str(exc) else ""
            raise StoreError(f"Redis store: {operation} failed: "
                             f"{type(exc).__name__}: {reason}") from exc

    async def ping(self) -> None:
        """A write (the heartbeat key): a Redis at ``maxmemory`` with ``noeviction``, or a
        read-only replica, answers PING but cannot take a new session."""
        with self._errors("ping"):
            await self.redis.set(self._once(Namespace.HEARTBEAT + "ping"), repr(self._clock()),
                                 px=HEARTBEAT_TTL_MS)

    # -- sessions ------------------------------------------------------------------------

    def _session(self, key: str) -> str:
        return f"{self._p}session:{key}"

    def _index(self, kind: str, value: str) -> str:
        """An index key: a hash of the value, so any subject or handle makes a short key."""
        return f"{self._p}{kind}:{hashlib.sha256(value.encode()).hexdigest()}"

    async def put_session(self, session: StoredSession) -> None:
        s = session
        now = self._clock()
        ttl_ms = math.ceil((s.expires - now) * 1000)
        if ttl_ms <= 0:  # already over: storing it would only be deleted again
            await self.delete_session(s.key)
            return
        indexes = [f"{self._p}sessions", self._index("subject", s.subject)]
        fields = {"subject": s.subject, "logout_handle": s.logout_handle,
                  "principal": s.principal_json, "created": repr(s.created),
                  "last_seen": repr(s.last_seen), "expires": repr(s.expires),
                  "user_agent": s.user_agent, "client_ip": s.client_ip, "si": indexes[1]}
        if s.logout_handle:  # no handle, no logout index: nothing can name the session
            fields["li"] = self._index("logout", s.logout_handle)
            indexes.append(fields["li"])
        args: list[str | int] = [s.key, repr(s.expires), repr(now), ttl_ms,
                                 *(x for pair in fields.items() for x in pair)]
        with self._errors("put_session"):
            await self._put(keys=[self._session(s.key), *indexes], args=args)

    async def get_session(self, key: str) -> StoredSession | None:
        with self._errors("get_session"):
            values = await self.redis.hmget(self._session(key), _FIELDS)
        return self._stored(key, values)

    def _stored(self, key: str, values: list[Any]) -> StoredSession | None:
        if any(v is None for v in values):
            return None
        subject, handle, principal, created, last_seen, expires, agent, ip = map(str, values)
        if float(expires) <= self._clock():
            return None
        return StoredSession(key, subject, handle, principal, float(created),
                             float(last_seen), float(expires), agent, ip)

    async def touch_session(self, key: str, last_seen: float) -> None:
        with self._errors("touch_session"):
            await self._touch(keys=[self._session(key), self._changes],
                              args=[repr(last_seen), key, CHANGES_KEPT])

    async def delete_session(self, key: str) -> bool:
        with self._errors("delete_session"):
            return bool(await self._delete(
                keys=[self._session(key), f"{self._p}sessions", self._changes],
                args=[key, CHANGES_KEPT]))

    async def _indexed(self, index: str) -> list[StoredSession]:
        with self._errors("list sessions"):
            keys = [str(k) for k in
                    await self.redis.zrangebyscore(index, f"({self._clock()!r}", "+inf")]
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(self._session(key), _FIELDS)
                rows = await pipe.execute()
        found = [s for k, v in zip(keys, rows, strict=True) if (s := self._stored(k, v))]
        return sorted(found, key=lambda s: s.created)

    async def list_sessions(self, subject: str | None = None) -> list[StoredSession]:
        if subject is None:
            return await self._indexed(f"{self._p}sessions")
        found = await self._indexed(self._index("subject", subject))
        return [s for s in found if s.subject == subject]

    async def delete_subject_sessions(self, subject: str) -> int:
        with self._errors("delete_subject_sessions"):
            keys = await self.redis.zrange(self._index("subject", subject), 0, -1)
        return sum([await self.delete_session(str(key)) for key in keys])

    async def sessions_for_logout(self, logout_handle: str) -> list[StoredSession]:
        if not logout_handle:  # no handle names no session
            return []
        found = await self._indexed(self._index("logout", logout_handle))
        return [s for s in found if s.logout_handle == logout_handle]

    @property
    def _changes(self) -> str:
        return f"{self._p}changes"

    async def changed_since(self, cursor: str) -> tuple[str, list[str]] | None:
        # The cursor is "<last entry ID seen>/<entries ever added then>": the stream's
        # ``entries-added`` then tells whether anything between was trimmed away.
        last_id, _, added = cursor.partition("/")
        with self._errors("changed_since"):
            async with self.redis.pipeline(transaction=True) as pipe:  # one moment in time
                pipe.xinfo_stream(self._changes)
                pipe.xrange(self._changes, f"({last_id or '0-0'}", count=CHANGES_READ + 1)
                info, entries = await pipe.execute(raise_on_error=False)
        if isinstance(info, Exception):  # no stream: nothing was ever logged
            info = {"last-generated-id": "0-0", "entries-added": 0, "length": 0}
        if isinstance(entries, Exception):
            return None
        now_added = int(info.get("entries-added", -1))
        top = str(info["last-generated-id"])
        if not cursor:
            return f"{top}/{now_added}", []
        if not added.lstrip("-").isdigit() or _stream_id(last_id) > _stream_id(top):
            return None  # not our cursor: another Redis, or one emptied since
        if len(entries) > CHANGES_READ:
            return None
        if now_added >= 0 and int(added) >= 0:
            gap = now_added - int(added) != len(entries)
        else:  # before Redis 7: trimming starts at about CHANGES_KEPT entries
            gap = int(info["length"]) >= CHANGES_KEPT * 0.9
        if gap:
            return None
        keys = [str(fields["k"]) for _, fields in entries]
        return f"{str(entries[-1][0]) if entries else last_id}/{now_added}", keys

    async def count_sessions(self) -> int:
        with self._errors("count_sessions"):
            return int(await self.redis.zcount(f"{self._p}sessions", f"({self._clock()!r}",
                                               "+inf"))

    # -- keys and counters ---------------------------------------------------------------

    def _once(self, key: str) -> str:
        return f"{self._p}once:{key}"

    def _counted(self, key: str) -> str | None:
        """The index key of the counted prefix ``key`` has, if any."""
        prefix = next((p for p in COUNTED if key.startswith(p)), None)
        return None if prefix is None else f"{self._p}index:{prefix}"

    async def add_once(self, key: str, value: str, ttl: float) -> bool:
        now = self._clock()
        ttl_ms = max(math.ceil(ttl * 1000), 1)
        args: list[str | int] = [f"{now + ttl!r}\n{value}", repr(now), ttl_ms]
        index = self._counted(key)
        with self._errors("add_once"):
            if index is not None:
                return bool(await self._add_once(keys=[self._once(key), index],
                                                 args=[*args, key, repr(now + ttl)]))
            return bool(await self._add_once(keys=[self._once(key)], args=args))

    async def take(self, key: str) -> str | None:
        index = self._counted(key)
        with self._errors("take"):
            if index is None:
                return self._live(await self.redis.getdel(self._once(key)))
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.getdel(self._once(key))
                pipe.zrem(index, key)
                raw, _ = await pipe.execute()
            return self._live(raw)

    async def get(self, key: str) -> str | None:
        with self._errors("get"):
            return self._live(await self.redis.get(self._once(key)))

    def _live(self, raw: object) -> str | None:
        """The value of a stored ``"<ends>\\n<value>"``, if its time (by our clock) is not up."""
        if raw is None:
            return None
        ends, _, value = str(raw).partition("\n")
        return value if float(ends) > self._clock() else None

    async def count(self, key: str, ttl: float) -> int:
        # A fixed window named by the gateway's clock, so the count follows that clock;
        # Redis's own expiry only clears the key away afterwards.
        window = int(self._clock() // ttl) if ttl > 0 else 0
        name = f"{self._p}count:{key}:{window}"
        with self._errors("count"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incr(name)
                pipe.pexpire(name, max(math.ceil(ttl * 2000), 1))
                value, _ = await pipe.execute()
        return int(value)

    async def count_keys(self, prefix: str) -> int:
        if prefix in COUNTED:  # one ZCOUNT over the prefix's index, however many keys
            with self._errors("count_keys"):
                return int(await self.redis.zcount(f"{self._p}index:{prefix}",
                                                   f"({self._clock()!r}", "+inf"))
        # Any other prefix (not used by the gauges): a SCAN over the matching keys.
        live = 0
        with self._errors("count_keys"):
            async for name in self.redis.scan_iter(match=_glob(self._once(prefix)) + "*",
                                                   count=1000):
                if self._live(await self.redis.get(name)) is not None:
                    live += 1
        return live

    # -- records ---------------------------------------------------------------------------
    # Registrations are the one key without a TTL (it grows with registrants, not traffic).
    # Expiring records live beside the keys, with the key text older versions wrote.

    async def add_registration(self, registration: Registration) -> None:
        r = registration
        entry = json.dumps([r.email, r.registered_at, r.consent, r.subject, r.verified_at])
        with self._errors("add_registration"):
            await self.redis.rpush(f"{self._p}registrations", entry)

    async def list_registrations(self) -> list[Registration]:
        with self._errors("list_registrations"):
            entries = await self.redis.lrange(f"{self._p}registrations", 0, -1)
        # Entries written before subjects were kept have three values: the rest default.
        found = [Registration(*json.loads(e)) for e in entries]
        return sorted(found, key=lambda r: r.registered_at)  # stable: ties keep push order

    async def delete_registrations(self, *, email: str = "", subject: str = "",
                                   registered_before: float | None = None
                                   ) -> list[Registration]:
        where, value = registration_criterion(email, subject, registered_before)
        text = repr(value) if isinstance(value, float) else value
        with self._errors("delete_registrations"):
            gone = await self._delete_registrations(keys=[f"{self._p}registrations"],
                                                    args=[where, text])
        return sorted((Registration(*json.loads(e)) for e in gone),
                      key=lambda r: r.registered_at)

    async def put_record(self, key: str, value: str, ttl: float) -> None:
        ends = self._clock() + ttl
        with self._errors("put_record"):
            await self.redis.set(self._once(key), f"{ends!r}\n{value}",
                                 px=max(math.ceil(ttl * 1000), 1))

    async def get_record(self, key: str) -> str | None:
        return await self.get(key)

    async def purge_expired(self) -> int:
        """Redis expires keys itself; this drops what the gateway's clock says is over.
        One replica at a time (``purge-lock``); the others skip this round."""
        now = self._clock()
        lock = f"{self._p}purge-lock"
        with self._errors("purge_expired"):
            if not await self.redis.set(lock, repr(now), nx=True, ex=PURGE_LOCK_SECONDS):
                return 0
            try:
                return await self._purge(now)
            finally:
                await self.redis.delete(lock)

    async def _purge(self, now: float) -> int:
        with self._errors("purge_expired"):
            for prefix in COUNTED:
                await self.redis.zremrangebyscore(f"{self._p}index:{prefix}", "-inf", repr(now))
            over = await self.redis.zrangebyscore(f"{self._p}sessions", "-inf", repr(now))
            gone = sum([await self.delete_session(str(key)) for key in over])
            batch: list[str] = []
            async for name in self.redis.scan_iter(match=_glob(self._once("")) + "*",
                                                   count=500):
                batch.append(name)
                if len(batch) >= 500:
                    gone += await self._drop_batch(batch, now)
                    batch = []
            if batch:
                gone += await self._drop_batch(batch, now)
        return gone

    async def _drop_batch(self, names: list[str], now: float) -> int:
        """Drop the ended ones of ``names``: one round trip for the lot (a pipeline)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                await self._drop(keys=[name], args=[repr(now)], client=pipe)
            return sum(int(x) for x in await pipe.execute())


def _stream_id(text: str) -> tuple[int, int]:
    millis, _, seq = text.partition("-")
    return int(millis), int(seq or 0)


def _glob(text: str) -> str:
    """``text`` with the glob characters of a SCAN pattern escaped."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, dict[str, str]]:
    """``redis+sentinel://[user:pw@]h:p[,h:p]/service[/db]`` → hosts, service, db, credentials."""
    rest = url.removeprefix("redis+sentinel://")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    creds: dict[str, str] = {}
    if at:
        user, colon, password = userinfo.partition(":")
        if user:
            creds["username"] = unquote(user)
        if colon:
            creds["password"] = unquote(password)
    hosts = []
    for item in hostlist.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise StoreError(f"bad Sentinel address {item!r}: expected host:port")
        hosts.append((host.strip("[]"), int(port)))
    service, _, db = path.strip("/").partition("/")
    if not service or (db and not db.isdigit()):
        raise StoreError("a Sentinel URL needs /service_name[/db] after the hosts")
    return hosts, service, int(db or 0), creds
