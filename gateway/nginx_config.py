"""The edge mode: an nginx configuration, written from ``gateway.toml``, in which nginx
carries the bytes and asks the gateway's forward-auth endpoint about each request.

nginx answers from a cache of the gateway's "allowed" answers, kept per exact Cookie
header, method, host and URI for at most one second (the gateway's revocation bound: it
reads the session from the store for these answers, and its ``X-Accel-Expires`` ends each
at the end of the second of that read; nginx and the gateway share a clock);
the identity headers and token come from that answer. Every other answer (sign-in,
401, 403) is the gateway's own: nginx hands such a request to the gateway, which
decides again and renders it. Sign-in, ACS, sign-out and the gateway's pages go to the
gateway. What a client must not choose is cleared before anything else runs: the
identity headers, the token, forwarding headers and the header families of other auth
proxies (with the headers-more module), and the gateway's own cookies are cut out of
the Cookie header the upstream gets.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from gateway.config_schema import Settings
from gateway.cookies import Cookies
from gateway.hot_path import OWN_PATHS, OWN_PREFIXES
from gateway.proxy_headers import AUTH_HEADERS, AUTH_PREFIXES, DROP_PREFIXES
from gateway.stash import STASH_TTL

#: Debian's package for ``more_clear_input_headers`` (libnginx-mod-http-headers-more-filter).
HEADERS_MORE = "/usr/lib/nginx/modules/ngx_http_headers_more_filter_module.so"
#: How long nginx may answer from a cached "allowed": the revocation bound.
CACHE_SECONDS = 1
#: The gateway's own cookies cut out of the upstream's Cookie header, one per pass; a
#: request carrying more of them than this is refused (a browser sends at most one of each).
COOKIE_PASSES = 8
# The login protocols' prefixes: SAML's. (A protocol added in code adds its prefix here.)
PROTOCOL_PREFIXES = ("/saml/",)
_AUTH = "/_sso_gateway_auth"
_NAME = re.compile(r"[A-Za-z0-9-]+")
#: What a shared secret may hold to be written in double quotes: visible ASCII and space,
#: but no quote, backslash or "$" (nginx would read a variable; it has no escape for it).
_QUOTABLE = re.compile(r"[ !#%&()*+,\-./0-9:;<=>?@A-Z\[\]^_`a-z{|}~]+")
#: Answer headers by which a proxied server steers nginx itself. From an upstream (or
#: what it relays) they are never followed: X-Accel-Redirect would move the request into
#: another upstream's location, with the member's identity headers and token. Nginx never
#: passes them to the client either (its default ``proxy_hide_header``). X-Accel-Buffering
#: is followed: it only lets an upstream stream its own answer (server-sent events).
STEERING = ("X-Accel-Redirect", "X-Accel-Expires", "X-Accel-Limit-Rate", "X-Accel-Charset")


@dataclass(frozen=True)
class EdgeOptions:
    """What ``gateway.toml`` does not say: where nginx listens and keeps its cache."""

    listen: str = ""  # default: the public URL's port
    gateway: str = ""  # where nginx reaches the gateway (host:port); default: its `listen`
    tls_cert: Path | None = None
    tls_key: Path | None = None
    cache_dir: Path = Path("/var/cache/nginx/sso-gateway")
    full: bool = False  # a whole nginx.conf (main and events too), not an http{} include
    prefix_dir: Path | None = None  # full only: pid, logs and temporary files here


class EdgeConfigError(ValueError):
    """The configuration cannot be carried to nginx; the message says why."""


def nginx_config(settings: Settings, options: EdgeOptions = EdgeOptions()) -> str:
    """The nginx configuration for ``settings``: an ``http {}`` include, or a whole file."""
    public = urlsplit(settings.public_url)
    https = public.scheme == "https"
    if https and not (options.tls_cert and options.tls_key):
        raise EdgeConfigError(f"public_url {settings.public_url} is https: give nginx the "
                              "certificate and key (--tls-cert, --tls-key)")
    if settings.proxy.strip_prefixes:
        for prefix in settings.proxy.strip_prefixes:
            _header_name(prefix.rstrip("-") or "-", "[proxy] strip_prefixes")
    listen = options.listen or str(public.port or (443 if https else 80))
    gateway = options.gateway or f"{settings.listen_host}:{settings.listen_port}"
    if not options.gateway and _unspecified(settings.listen_host):
        gateway = f"127.0.0.1:{settings.listen_port}"
    cookies = Cookies(secure=settings.cookie_secure, session_name=settings.session.cookie_name,
                      session_lifetime=settings.session.lifetime, stash_ttl=STASH_TTL)
    identity = [*dict.fromkeys([*settings.identity_headers.values(),
                                settings.identity.token_header])]
    for name in identity:
        _header_name(name, "identity header")
    lines: list[str] = []
    add = lines.append
    add(f"# Written by `sso-gateway nginx-config` for {settings.public_url}.")
    add("# Edge mode: nginx proxies; the gateway at " + gateway + " decides (docs/deploy.md).")
    add(f"proxy_cache_path {options.cache_dir} levels=1:2 keys_zone=sso_gateway_auth:10m "
        "max_size=256m inactive=10s use_temp_path=off;")
    add(f"upstream sso_gateway {{ server {gateway}; keepalive 64; }}")
    for index, up in enumerate(settings.upstreams):
        target = urlsplit(up.url)
        add(f"upstream sso_gateway_up{index} {{ server {target.hostname}:"
            f"{target.port or (443 if target.scheme == 'https' else 80)}; keepalive 64; }}")
    add(_cookie_maps(cookies.own_names))
    add("map $request_method $sso_gateway_no_cache { GET 0; HEAD 0; default 1; }")
    add("server {")
    if https:
        add(f"  listen {listen} ssl;")
        add(f"  ssl_certificate {options.tls_cert};")
        add(f"  ssl_certificate_key {options.tls_key};")
        add("  ssl_protocols TLSv1.2 TLSv1.3;")
        add("  ssl_prefer_server_ciphers off;")
    else:
        add(f"  listen {listen};")
    add(f"  server_name {' '.join(sorted(settings.hosts))};")
    add("  # Headers with '_' or '.' in their names never reach anyone (nginx's default).")
    add("  ignore_invalid_headers on;")
    add(f"  client_max_body_size {settings.max_body_bytes};")
    add("  proxy_http_version 1.1;")
    add("  proxy_set_header Connection \"\";")
    add("  proxy_set_header Host $http_host;  # the gateway answers its public host names")
    add("  proxy_set_header X-Forwarded-For $remote_addr;")
    add("  proxy_set_header X-Forwarded-Proto $scheme;")
    add("  # nginx's own ID: the gateway takes it over from a trusted proxy, never a client's.")
    add("  proxy_set_header X-Request-Id $request_id;")
    add("  # No answer steers nginx: neither the gateway's nor an upstream's it relays.")
    add("  proxy_ignore_headers " + " ".join(STEERING) + ";")
    add("  # What only the gateway may say: cleared from every client request first.")
    cleared = [*identity, *sorted(_title(h) for h in AUTH_HEADERS)]
    prefixes = [*DROP_PREFIXES, *AUTH_PREFIXES,
                *(p.encode("latin-1") for p in settings.proxy.strip_prefixes)]
    cleared += [_title(p) + "*" for p in prefixes]
    cleared += [*settings.proxy.strip_headers, "Forwarded", "X-Real-IP"]
    for chunk in range(0, len(cleared), 6):
        add("  more_clear_input_headers " + " ".join(
            f"'{name}'" for name in cleared[chunk:chunk + 6]) + ";")
    add("  if ($sso_gateway_cookie_refused) { return 400; }")
    own = [*OWN_PREFIXES, *PROTOCOL_PREFIXES]
    add("  # The gateway's own pages, sign-in, ACS and sign-out.")
    for prefix in own:
        if prefix == "/auth/":
            add("  location ^~ /auth/ { return 404; }  # forward-auth: nginx's own subrequest only")
            continue
        add(f"  location ^~ {prefix} {{ proxy_pass http://sso_gateway; }}")
    for path in sorted(OWN_PATHS):
        add(f"  location = {path} {{ proxy_pass http://sso_gateway; }}")
    add(f"  location = {_AUTH} {{")
    add("    internal;")
    add("    proxy_pass http://sso_gateway/auth/check;")
    add("    proxy_pass_request_body off;")
    add("    proxy_set_header Content-Length \"\";")
    add("    proxy_set_header Connection \"\";")
    add("    proxy_set_header Host $http_host;")
    add("    proxy_set_header X-Forwarded-For $remote_addr;")
    add("    proxy_set_header X-Forwarded-Proto $scheme;")
    add("    proxy_set_header X-Request-Id $request_id;")
    add("    proxy_set_header Cookie $http_cookie;  # the cache key is exactly what is decided on")
    lines.extend(_original_request(settings))
    add("    proxy_cache sso_gateway_auth;")
    add("    proxy_cache_key \"$request_method|$http_host|$request_uri|$http_cookie\";")
    add(f"    proxy_cache_valid 200 {CACHE_SECONDS}s;  # allowed answers only; the gateway's")
    add("    # X-Accel-Expires ends each at the end of the second its session was read in")
    add("    # The answer is no-store for browsers; X-Accel-Expires is the gateway's word.")
    add("    proxy_ignore_headers Cache-Control Expires " + " ".join(
        h for h in STEERING if h != "X-Accel-Expires") + ";")
    add("    proxy_no_cache $sso_gateway_no_cache;")
    add("    proxy_cache_bypass $sso_gateway_no_cache;")
    add("  }")
    add("  # Anything the gateway does not simply allow: it decides again and answers itself")
    add("  # (the sign-in redirect or 401, the 403 page); 500: the gateway cannot be asked.")
    add("  location @sso_gateway { proxy_pass http://sso_gateway; }")
    add("  location @sso_gateway_down {")
    add("    default_type text/plain;")
    add("    return 503 \"The sign-in service is not available. Please try again shortly.\\n\";")
    add("  }")
    for index, up in sorted(enumerate(settings.upstreams),
                            key=lambda item: len(item[1].prefix), reverse=True):
        prefix = up.prefix.rstrip("/") + "/"
        target = urlsplit(up.url)
        block = _protected(index, target, identity, up.name, public)
        add(f"  location ^~ {prefix} {{\n{block}  }}")
        if prefix != "/":
            add(f"  location = {prefix.rstrip('/')} {{\n{block}  }}")
    add("}")
    body = "\n".join(lines) + "\n"
    if not options.full:
        return body
    return _whole(body, options.prefix_dir or Path("/var/lib/nginx"))


def _original_request(settings: Settings) -> list[str]:
    """The auth subrequest's headers naming the original request, and the shared secret,
    as ``[forward_auth]`` has the gateway read them."""
    forward_auth = settings.forward_auth
    method, uri, host = forward_auth.headers
    out = []
    for name, value in ((uri, "$request_uri"), (method, "$request_method"),
                        (host, "$http_host")):
        if name:
            _header_name(name, "[forward_auth] header")
            out.append(f"    proxy_set_header {name} {value};")
    secret = forward_auth.shared_secret
    if secret is not None:
        value = secret.get_secret_value()
        if not _QUOTABLE.fullmatch(value):
            raise EdgeConfigError("[forward_auth] shared_secret holds a quote, backslash, '$' "
                                  "or a character outside ASCII: nginx cannot send it; "
                                  "choose one of letters, digits and - _ (e.g. "
                                  "secrets.token_urlsafe(48))")
        name = forward_auth.shared_secret_header
        _header_name(name, "[forward_auth] shared_secret_header")
        out.append(f'    proxy_set_header {name} "{value}";  # the shared secret')
    return out


def _protected(index: int, target: SplitResult, identity: list[str], name: str,
               public: SplitResult) -> str:
    """One upstream's location: ask (or the cache), copy the identity, proxy the raw URI."""
    scheme = target.scheme or "http"
    host = target.netloc.rpartition("@")[2]
    copy = "".join(
        f"    auth_request_set $sso_gateway_h{i} $upstream_http_{h.lower().replace('-', '_')};\n"
        f"    proxy_set_header {h} $sso_gateway_h{i};\n" for i, h in enumerate(identity))
    tls = ("    proxy_ssl_server_name on;\n    proxy_ssl_verify on;\n"
           "    proxy_ssl_trusted_certificate /etc/ssl/certs/ca-certificates.crt;\n"
           if scheme == "https" else "")
    return (f"    # upstream {name!r}\n"
            f"    auth_request {_AUTH};\n"
            "    error_page 401 403 = @sso_gateway;\n"
            "    error_page 500 = @sso_gateway_down;\n"
            f"{copy}"
            "    proxy_set_header Cookie $sso_gateway_cookie;\n"
            "    proxy_set_header Connection \"\";\n"
            f"    proxy_set_header Host {host};\n"
            "    proxy_set_header X-Forwarded-For $remote_addr;\n"
            f"    proxy_set_header X-Forwarded-Proto {public.scheme};\n"
            f"    proxy_set_header X-Forwarded-Host {public.netloc};\n"
            "    proxy_set_header X-Request-Id $request_id;\n"
            f"    proxy_redirect {scheme}://{host}/ /;\n"
            f"{tls}"
            "    # A variable keeps the client's URI byte for byte: the path the gateway\n"
            "    # decided on is the path the upstream gets.\n"
            f"    proxy_pass {scheme}://sso_gateway_up{index}{target.path.rstrip('/')}"
            "$request_uri;\n")


def _cookie_maps(own: tuple[str, ...]) -> str:
    """Maps that cut the gateway's cookies out of ``Cookie``, one per pass; the last says
    whether one is still there (the request is then refused)."""
    names = "|".join(re.escape(n) + ("[^=;]*" if n.endswith("_") or n.endswith("-") else "")
                     for n in own)
    cookie = rf"(?:^|;)\s*(?:{names})=[^;]*"
    out, source = [], "$http_cookie"
    for step in range(COOKIE_PASSES):
        target = f"$sso_gateway_cookie{step}" if step < COOKIE_PASSES - 1 else "$sso_gateway_cookie"
        out.append(f'map {source} {target} {{ "~^(?<a>.*?){cookie}(?<b>.*)$" "$a$b"; '
                   f"default {source}; }}")
        source = target
    out.append(f'map $sso_gateway_cookie $sso_gateway_cookie_refused {{ "~{cookie}" 1; '
               "default 0; }")
    return "\n".join(out)


def _whole(http_body: str, prefix: Path) -> str:
    indented = "".join("  " + line if line else line for line in http_body.splitlines(True))
    return (f"load_module {HEADERS_MORE};\n"
            "worker_processes auto;\n"
            f"pid {prefix}/nginx.pid;\n"
            f"error_log {prefix}/error.log warn;\n"
            "events { worker_connections 4096; }\n"
            "http {\n"
            "  access_log off;\n"
            f"  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;\n"
            f"  fastcgi_temp_path {prefix}/fastcgi; uwsgi_temp_path {prefix}/uwsgi;\n"
            f"  scgi_temp_path {prefix}/scgi;\n"
            f"{indented}"
            "}\n")


def warnings(settings: Settings) -> list[str]:
    """What an admin should know before putting nginx in front in edge mode."""
    out = []
    if not settings.trusted_proxies:
        out.append("trusted_proxies is empty: the gateway will see nginx's address as every "
                   "client's (rate limits, logs); add nginx's address, e.g. 127.0.0.1")
    if not _unspecified(settings.listen_host) and not settings.listen_host.startswith("127."):
        out.append(f"the gateway listens on {settings.listen_host}: in edge mode only nginx "
                   "should reach it (listen on 127.0.0.1 or a private address)")
    return out


def _unspecified(host: str) -> bool:
    try:
        return not host or ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _title(name: bytes) -> str:
    return "-".join(part.capitalize() for part in name.decode("latin-1").split("-"))


def _header_name(name: str, what: str) -> None:
    if not _NAME.fullmatch(name):
        raise EdgeConfigError(f"{what} {name!r} cannot be written into an nginx configuration")
