"""The languages of the gateway's own pages: gettext catalogues, and the one a request gets.

English is the source language (the texts in the templates and the code); each other
language is a Babel/gettext catalogue shipped as ``locale/<lang>/LC_MESSAGES/messages.po``
and compiled in memory when the gateway starts (no compiled ``.mo`` file to go stale).
A request gets the language of the ``gw_lang`` cookie the page's language switch sets,
else the best match of its ``Accept-Language`` among the offered languages
(``[ui] languages``), else ``[ui] default_language``.

The choice is bound to the request (``bind``) and made only when a page is rendered, so
proxied requests never pay for it. JSON answers stay English.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, MutableMapping, Sequence
from contextvars import ContextVar, Token
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import quote

from babel.core import Locale, negotiate_locale
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import NullTranslations, Translations

from gateway.cookies import Cookies
from gateway.errors import ConfigError

LOCALE_DIR = Path(__file__).parent / "locale"
SOURCE_LANGUAGE = "en"
DOMAIN = "messages"
_MAX_ACCEPT = 1024  # characters of Accept-Language read
_MAX_RANGES = 16  # language ranges of Accept-Language considered


def catalogue_path(lang: str) -> Path:
    """Where the catalogue of ``lang`` lives in the package."""
    return LOCALE_DIR / lang / "LC_MESSAGES" / f"{DOMAIN}.po"


def shipped() -> tuple[str, ...]:
    """English and every language with a catalogue in the package."""
    found = sorted(p.parent.parent.name for p in LOCALE_DIR.glob(f"*/LC_MESSAGES/{DOMAIN}.po"))
    return (SOURCE_LANGUAGE, *(lang for lang in found if lang != SOURCE_LANGUAGE))


@functools.cache
def translations(lang: str) -> NullTranslations:
    """The compiled catalogue of ``lang`` (English: the texts as written)."""
    if lang == SOURCE_LANGUAGE:
        return NullTranslations()
    with catalogue_path(lang).open("rb") as po:
        catalog = read_po(po, locale=lang, domain=DOMAIN)
    compiled = BytesIO()
    write_mo(compiled, catalog)  # fuzzy entries are left out, as msgfmt does
    compiled.seek(0)
    return Translations(compiled, domain=DOMAIN)


@functools.cache
def native_name(lang: str) -> str:
    """A language's name in that language (``Deutsch``), for the language switch."""
    name = Locale.parse(lang).get_display_name(lang) or lang
    return name[:1].upper() + name[1:]


def preferred(accept_language: str) -> list[str]:
    """The language tags of an ``Accept-Language`` header, most wanted first (by q-value,
    then by order); ``q=0`` and ``*`` are left out, and so is anything malformed."""
    ranked: list[tuple[float, int, str]] = []
    for index, item in enumerate(accept_language[:_MAX_ACCEPT].split(",")[:_MAX_RANGES]):
        tag, _, params = item.strip().partition(";")
        tag = tag.strip()
        if not tag or len(tag) > 35 or not (tag.isascii() and tag.replace("-", "").isalnum()):
            continue
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = -1.0
        if 0 < quality <= 1:
            ranked.append((-quality, index, tag))
    return [tag for _, _, tag in sorted(ranked)]


class Languages:
    """The languages a gateway offers (``[ui]``) and the choice for one request."""

    def __init__(self, offered: Sequence[str], default: str, *, cookie_name: str) -> None:
        self.offered = tuple(offered)
        self.default = default
        self.cookie_name = cookie_name
        # language tags as browsers write them (``pt-br``) → the catalogue's code (``pt_BR``)
        self._by_tag = {lang.replace("_", "-").lower(): lang for lang in self.offered}
        for lang in self.offered:  # a broken catalogue stops the start, not a page
            try:
                translations(lang)
            except (OSError, ValueError) as exc:
                raise ConfigError([f"ui.languages: the catalogue of {lang!r} "
                                   f"({catalogue_path(lang)}) cannot be read: {exc}"]) from exc

    def choose(self, accept_language: str, cookie: str | None) -> str:
        """The cookie's language if it is offered, else the best match of
        ``Accept-Language``, else the default."""
        if cookie in self.offered:
            return cookie
        found = negotiate_locale(preferred(accept_language), list(self._by_tag), sep="-")
        # Babel answers in the browser's spelling ("DE"): always one of ours, or the default
        return self._by_tag.get(found.lower(), self.default) if found else self.default

    def for_headers(self, headers: Iterable[tuple[bytes, bytes]]) -> str:
        """The language for a request's raw ASGI headers."""
        listed = list(headers)
        accept = b", ".join(v for k, v in listed if k == b"accept-language")
        return self.choose(accept.decode("latin-1"), Cookies.read(listed, self.cookie_name))


class _Bound:
    """A request's language inputs; the choice is made once, when a page first needs it."""

    __slots__ = ("_code", "_scope", "languages")

    def __init__(self, languages: Languages, scope: MutableMapping[str, Any]) -> None:
        self.languages = languages
        self._scope = scope
        self._code = ""

    @property
    def code(self) -> str:
        if not self._code:
            self._code = self.languages.for_headers(self._scope.get("headers", ()))
        return self._code

    @property
    def target(self) -> str:
        """The request's path (as sent) and query; ``/`` after a form was posted (a GET
        of a form's action is seldom a page)."""
        if self._scope.get("method", "GET") not in ("GET", "HEAD"):
            return "/"
        raw = self._scope.get("raw_path") or quote(self._scope.get("path", "/")).encode()
        raw = raw.partition(b"?")[0]
        query = self._scope.get("query_string", b"")
        return (raw + (b"?" + query if query else b"")).decode("latin-1")


_request: ContextVar[_Bound | None] = ContextVar("gateway_page_language", default=None)


def bind(languages: Languages, scope: MutableMapping[str, Any]) -> Token[_Bound | None]:
    """Bind the current request (its ASGI scope: the headers, and the path and query its
    pages switch language back to) for the pages it renders; ``unbind`` afterwards."""
    return _request.set(_Bound(languages, scope))


def unbind(token: Token[_Bound | None]) -> None:
    _request.reset(token)


def current() -> str:
    """The language of the current request's pages (English outside a request)."""
    bound = _request.get()
    return bound.code if bound is not None else SOURCE_LANGUAGE


def offered() -> tuple[str, ...]:
    """The languages the current request's pages offer in their switch."""
    bound = _request.get()
    return bound.languages.offered if bound is not None else (SOURCE_LANGUAGE,)


def current_target() -> str:
    """The path and query of the current request (``/`` outside one)."""
    bound = _request.get()
    return bound.target if bound is not None else "/"


def gettext(message: str) -> str:
    """``message`` in the current request's language (itself when it has no translation)."""
    return translations(current()).gettext(message)


def ngettext(singular: str, plural: str, n: int) -> str:
    return translations(current()).ngettext(singular, plural, n)
