"""Low-entropy session secrets are refused (issue 14, item 15).

A session secret of 48 times ``a`` passed ``check``: long enough, and guessable. The
config now estimates what a secret's characters can hold and refuses hand-made ones
(one character, a repeated block, an alphabet walk, too few bits) with a message that
names the key and masks the value, while every random secret in base64 or hex (what
``certs generate``, ``secrets.token_urlsafe`` and ``openssl rand -hex`` give) passes.
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import load_settings, secret_weakness
from gateway.demo.stack import prepare
from gateway.errors import ConfigError
from tests.conftest import seed_demo_keys

WEAK = {
    "one character": "a" * 48,
    "two alternating": "ab" * 24,
    "a word over and over": "password" * 6,
    "the alphabet twice": string.ascii_lowercase * 2,
    "an alphabet walk": string.ascii_lowercase + string.ascii_uppercase,
    "digits over and over": "0123456789" * 5,
    "almost one character": "a" * 47 + "b",
    "few characters": "aabbaabbabababbbaaabbabaabbbaaababbabbaabbabbbaabab",
}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    seed_demo_keys(tmp_path)
    prepare(tmp_path, gateway_url="http://127.0.0.1:8000", idp_url="http://127.0.0.1:8001",
            reader_url="http://127.0.0.1:8002")
    return tmp_path


def use_secret(site: Path, secret: str) -> Path:
    (site / "session-secrets").write_text(secret + "\n")
    return site / "gateway.toml"


@pytest.mark.parametrize("why", sorted(WEAK))
def test_hand_made_secrets_are_refused(site: Path, why: str) -> None:
    secret = WEAK[why]
    with pytest.raises(ConfigError) as refused:
        load_settings(use_secret(site, secret), environ={})
    text = str(refused.value)
    assert "key session.secrets[0] ('**********'): not random enough: " in text, text
    assert secret not in text and secret[:12] not in text
    assert "secrets.token_urlsafe(48)" in text


def test_check_refuses_48_times_a(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(use_secret(site, "a" * 48))]) == 2
    err = capsys.readouterr().err
    assert "key session.secrets[0] ('**********'): not random enough: it repeats a block of " \
           "1 character" in err
    assert "a" * 48 not in err


def test_an_inline_secret_is_checked_too(site: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(site / "gateway.toml",
                      environ={"GATEWAY_SESSION__SECRETS": '["' + "ab" * 24 + '"]'})
    assert "key session.secrets[0] ('**********'): not random enough: it repeats a block " \
           "of 2 characters" in str(refused.value)


def test_random_secrets_pass(site: Path, tmp_path_factory: pytest.TempPathFactory,
                             capsys: pytest.CaptureFixture[str]) -> None:
    # What `certs generate` writes, through the command itself.
    certs = tmp_path_factory.mktemp("certs")
    assert main(["certs", "generate", "--dir", str(certs)]) == 0
    generated = (certs / "session-secrets").read_text().strip()
    assert secret_weakness(generated) is None
    settings = load_settings(use_secret(site, generated), environ={})
    assert settings.session_secrets() == [generated]
    assert main(["check", "--config", str(site / "gateway.toml")]) == 0, capsys.readouterr()
    # Many more of each kind of random secret: none is mistaken for a hand-made one.
    for make in (lambda: secrets.token_urlsafe(48), lambda: secrets.token_urlsafe(32),
                 lambda: secrets.token_hex(32)):
        weak = [s for s in (make() for _ in range(20_000)) if secret_weakness(s)]
        assert weak == []
    assert load_settings(use_secret(site, secrets.token_hex(32)), environ={})
    for why, secret in WEAK.items():
        assert secret_weakness(secret) is not None, why
