"""Translated pages: the language a request gets, the switch, and complete catalogues.

The choice (cookie, ``Accept-Language`` with q-values, the default) is tested on
``gateway.i18n`` directly; the pages, the switch and its refusals over real sockets
against the demo stack; completeness by extracting the texts with Babel exactly as
``pybabel extract -F babel.cfg`` does and comparing with the shipped catalogue.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import httpx
import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.pofile import read_po
from pydantic import ValidationError

from gateway import errors, i18n
from gateway.config_schema import UISettings
from tests.browser import client, login
from tests.conftest import Stack

ROOT = Path(__file__).resolve().parent.parent
SECOND = "de"
TRANSLATED = i18n.shipped()[1:]  # every shipped language but English, the source
LANG_COOKIE = "__Secure-gw_lang"  # the tests' gateway runs over https
PLACEHOLDER = re.compile(r"%\(\w+\)s|%%|<[^>]+>")


def languages(default: str = "en") -> i18n.Languages:
    return i18n.Languages(["en", "de"], default, cookie_name="gw_lang")


# -- choosing the language ----------------------------------------------------------------

def test_accept_language_is_read_by_q_value_not_by_order() -> None:
    assert i18n.preferred("en;q=0.3, de-AT;q=0.9, fr, it;q=0, *;q=0.1") == ["fr", "de-AT", "en"]
    assert languages().choose("fr-CH, fr;q=0.9, de;q=0.8, en;q=0.5", None) == "de"
    assert languages().choose("en;q=0.4, de-DE;q=0.7", None) == "de"
    assert languages().choose("de;q=0.4, en-GB;q=0.7", None) == "en"
    assert languages().choose("DE-de, EN", None) == "de"  # always the catalogue's code
    assert languages().choose("EN", None) == "en"


def test_unknown_or_malformed_languages_fall_back_to_the_default() -> None:
    assert languages().choose("ja, zh-CN;q=0.8", None) == "en"
    assert languages().choose("", None) == "en"
    assert languages().choose("de;q=abc, <script>, " + "x" * 5000, None) == "en"
    assert languages(default="de").choose("ja", None) == "de"


def test_the_cookie_wins_over_accept_language_but_only_for_offered_languages() -> None:
    assert languages().choose("de", "en") == "en"
    assert languages().choose("en", "de") == "de"
    assert languages().choose("de", "xx") == "de"  # not offered: not believed
    assert i18n.Languages(["en"], "en", cookie_name="gw_lang").choose("de", "de") == "en"


def test_the_ui_settings_offer_only_shipped_languages() -> None:
    assert UISettings().languages == ["en", "de"] and UISettings().default == "en"
    with pytest.raises(ValidationError, match="'xx' has no catalogue"):
        UISettings(languages=["en", "xx"])
    with pytest.raises(ValidationError, match="default_language must be one of"):
        UISettings(languages=["en"], default_language="de")
    assert UISettings(languages=["de", "en"]).default == "de"


# -- the catalogue is complete ---------------------------------------------------------------

def extracted() -> dict[str, str]:
    """Every text of the gateway's pages, as ``pybabel extract -F babel.cfg`` finds it:
    msgid → where."""
    with (ROOT / "babel.cfg").open() as cfg:
        method_map, options_map = parse_mapping_cfg(cfg)
    found: dict[str, str] = {}
    for filename, lineno, message, _, _ in extract_from_dir(
            str(ROOT), method_map, options_map, strip_comment_tags=True):
        if isinstance(message, tuple):
            message = message[0]
        found.setdefault(message, f"{filename}:{lineno}")
    return found


def shipped(lang: str = SECOND) -> dict[str, str]:
    with i18n.catalogue_path(lang).open("rb") as po:
        catalog = read_po(po, locale=lang)
    found = {}
    for message in catalog:
        if not message.id:
            continue
        forms = message.string if isinstance(message.string, tuple) else (message.string,)
        text = message.id[0] if isinstance(message.id, tuple) else message.id
        done = all(forms) and "fuzzy" not in message.flags
        found[text] = str(forms[-1]) if done else ""  # a plural: its last form
    return found


def test_german_is_shipped() -> None:
    assert SECOND in TRANSLATED


@pytest.mark.parametrize("lang", TRANSLATED)
def test_every_text_of_the_pages_has_a_translation(lang: str) -> None:
    texts, catalogue = extracted(), shipped(lang)
    assert len(texts) > 80  # the extraction really read the templates and the code
    assert any(where.startswith("gateway/web/templates/") for where in texts.values())
    missing = [f"{where}: {text!r}" for text, where in texts.items() if not catalogue.get(text)]
    assert missing == [], "untranslated (run the steps in docs/operations.md, Languages)"
    stale = sorted(set(catalogue) - set(texts))
    assert stale == [], "texts no page uses any more: update the catalogue"


@pytest.mark.parametrize("lang", TRANSLATED)
def test_translations_keep_placeholders_and_markup(lang: str) -> None:
    """Same ``%(name)s`` and tags; no other ``%`` (pages format every text with ``%``)."""
    for text, translated in shipped(lang).items():
        assert sorted(PLACEHOLDER.findall(text)) == sorted(PLACEHOLDER.findall(translated)), text
        assert "%" not in PLACEHOLDER.sub("", translated), translated


def test_a_broken_catalogue_stops_the_start(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setattr(i18n, "LOCALE_DIR", tmp_path)  # a German catalogue gone missing
    i18n.translations.cache_clear()
    try:
        with pytest.raises(errors.ConfigError, match="the catalogue of 'de'"):
            languages()
    finally:
        monkeypatch.undo()
        i18n.translations.cache_clear()


def every_error_class() -> list[type[errors.GatewayError]]:
    found, todo = [], [errors.GatewayError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


def test_every_error_title_and_message_is_translated() -> None:
    """Also for an error class added later without marking its texts."""
    i18n.translations.cache_clear()
    german = i18n.translations(SECOND)
    for cls in every_error_class():
        for text in (cls.title, cls.public_message):
            assert german.gettext(text) != text, f"{cls.__name__}: {text!r}"


def literal_page_texts() -> list[tuple[str, str]]:
    """String literals the code gives as an error page's title or message, or a page's
    title: each must be in the catalogue (marked with ``N_`` or used by a template)."""
    found = []
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(("gateway/demo/", "gateway/devidp/", "gateway/selftest/")) or (
                rel == "gateway/websocket.py"):  # a refused upgrade's body is never shown
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            args: list[ast.expr] = []
            if node.func.id == "error_answer":
                args = list(node.args[1:3])
            if node.func.id in ("error_answer", "render"):
                args += [k.value for k in node.keywords if k.arg in ("title", "message")]
            for arg in args:
                if isinstance(arg, ast.Call) and getattr(arg.func, "id", "") == "N_":
                    arg = arg.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.append((f"{rel}:{node.lineno}", arg.value))
                elif isinstance(arg, ast.JoinedStr | ast.BinOp):  # no catalogue has it
                    found.append((f"{rel}:{node.lineno}", ast.unparse(arg)))
    return found


def test_texts_the_code_gives_to_pages_are_in_the_catalogue() -> None:
    catalogue = shipped()
    texts = literal_page_texts()
    assert len(texts) > 10
    missing = [f"{where}: {text!r}" for where, text in texts if not catalogue.get(text)]
    assert missing == []


# -- pages over real sockets --------------------------------------------------------------------

pytestmark_stack = pytest.mark.stack(shared=True)


def page(stack: Stack, path: str, **headers: str) -> httpx.Response:
    with client(stack) as http:
        return http.get(stack.url + path, headers=headers)


@pytestmark_stack
def test_a_page_follows_accept_language(stack: Stack) -> None:
    answer = page(stack, "/_gateway/no-such-page", **{"accept-language": "fr, de;q=0.8"})
    assert answer.status_code == 404
    assert '<html lang="de">' in answer.text
    assert "<h1>Nicht gefunden</h1>" in answer.text
    assert answer.headers["content-language"] == "de"
    assert answer.headers["vary"] == "Accept-Language, Cookie"
    assert answer.headers["cache-control"] == "no-store"
    english = page(stack, "/_gateway/no-such-page", **{"accept-language": "ja"})
    assert '<html lang="en">' in english.text and "<h1>Not found</h1>" in english.text
    assert english.headers["content-language"] == "en"


@pytestmark_stack
@pytest.mark.parametrize("header, lang", [
    ("DE", "de"), ("de-CH;q=0.9, EN;q=0.1", "de"), ("x" * 8000, "en"), ("de;q=NaN", "en"),
    ("\u00e9\u00e9, de;q=0.1".encode(), "de"), (",,,;;;q=", "en")])
def test_any_accept_language_gives_a_page(stack: Stack, header: str | bytes, lang: str) -> None:
    with client(stack) as http:
        answer = http.get(stack.url + "/_gateway/no-such-page",
                          headers={"accept-language": header})
    assert answer.status_code == 404
    assert f'<html lang="{lang}">' in answer.text
    assert answer.headers["content-language"] == lang


@pytestmark_stack
def test_the_switch_cookie_wins_over_accept_language(stack: Stack) -> None:
    answer = page(stack, "/_gateway/no-such-page",
                  **{"accept-language": "de", "cookie": f"{LANG_COOKIE}=en"})
    assert '<html lang="en">' in answer.text
    answer = page(stack, "/_gateway/no-such-page",
                  **{"accept-language": "en", "cookie": f"{LANG_COOKIE}=de"})
    assert '<html lang="de">' in answer.text


@pytestmark_stack
def test_each_page_offers_the_switch_back_to_itself(stack: Stack) -> None:
    answer = page(stack, "/_gateway/no-such-page?x=1", **{"accept-language": "de"})
    assert '<nav class="languages" aria-label="Sprache">' in answer.text
    assert ('<a href="/_gateway/language?lang=en&amp;next=%2F_gateway%2Fno-such-page%3Fx%3D1"'
            ' lang="en" hreflang="en">English</a>') in answer.text
    assert 'lang="de" hreflang="de" aria-current="true">Deutsch</a>' in answer.text
    with client(stack) as http:  # after a POST, the switch goes to the start page
        posted = http.post(stack.url + "/_gateway/no-such-page?x=1",
                           headers={"accept-language": "de", "origin": stack.url})
    assert posted.status_code == 404
    assert 'href="/_gateway/language?lang=en&amp;next=%2F"' in posted.text


@pytestmark_stack
def test_the_switch_sets_the_cookie_and_returns_to_the_page(stack: Stack) -> None:
    with client(stack) as http:
        answer = http.get(stack.url + "/_gateway/language",
                          params={"lang": "de", "next": "/saml/logout?a=1"})
        assert answer.status_code == 303
        assert answer.headers["location"] == "/saml/logout?a=1"
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["set-cookie"] == (
            f"{LANG_COOKIE}=de; Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax; Secure")
        back = http.get(stack.url + "/saml/logout?a=1")  # the jar sends the cookie now
    assert '<html lang="de">' in back.text and "Sie sind abgemeldet" in back.text


@pytestmark_stack
@pytest.mark.parametrize("target", [
    "https://evil.example/", "//evil.example/", "/\\evil.example/", "/%2e%2e/x",
    "javascript:alert(1)", " /x"])
def test_the_switch_refuses_a_next_that_is_not_a_local_path(stack: Stack, target: str) -> None:
    with client(stack) as http:
        answer = http.get(stack.url + "/_gateway/language",
                          params={"lang": "de", "next": target})
    assert answer.status_code == 400
    assert "location" not in answer.headers and "set-cookie" not in answer.headers


@pytestmark_stack
def test_the_switch_refuses_a_language_that_is_not_offered(stack: Stack) -> None:
    for lang in ("xx", "", "de;Path=/x", "DE"):
        with client(stack) as http:
            answer = http.get(stack.url + "/_gateway/language",
                              params={"lang": lang, "next": "/"})
        assert answer.status_code == 400
        assert "set-cookie" not in answer.headers


@pytestmark_stack
def test_error_titles_and_messages_from_the_code_are_translated(stack: Stack) -> None:
    ambiguous = page(stack, "/issues/%2e%2e/x", **{"accept-language": "de"})
    assert ambiguous.status_code == 400
    assert "<h1>Adresse nicht akzeptiert</h1>" in ambiguous.text
    assert "Diese Adresse enthält Zeichen oder Abschnitte" in ambiguous.text
    assert "Wenn Sie sich an den Support wenden, nennen Sie bitte die Referenz" in ambiguous.text


@pytestmark_stack
def test_json_answers_stay_english(stack: Stack) -> None:
    answer = page(stack, "/_gateway/no-such-page",
                  **{"accept-language": "de", "accept": "application/json"})
    assert answer.status_code == 404
    assert answer.json()["error"] == "Not found"
    assert "content-language" not in answer.headers


@pytestmark_stack
def test_signed_in_pages_and_the_upstream_never_sees_the_language_cookie(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, "/issues/2023-03/pages/14", "alice")
        http.cookies.set(LANG_COOKIE, "de", domain="127.0.0.1")
        sign_out = http.get(stack.url + "/saml/logout")
        assert '<html lang="de">' in sign_out.text
        assert "<h1>Abmelden</h1>" in sign_out.text
        assert '<button type="submit">Abmelden</button>' in sign_out.text
        sessions = http.get(stack.url + "/_gateway/sessions")
        assert "<h1>Ihre Sitzungen</h1>" in sessions.text
        stack.upstream.requests.clear()
        assert http.get(stack.url + "/issues/2023-03/pages/14").status_code == 200
    sent = stack.upstream.header_values("cookie")
    assert not any("gw_lang" in value for value in sent), sent
