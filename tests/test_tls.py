"""TLS of the gateway's own, over real sockets: ``sso-gateway serve --workers 2`` with
``[server] tls_cert_file``/``tls_key_file`` and ``http_redirect_listen``.

* New handshakes get a rotated certificate after ``sso-gateway reload`` (read from the
  peer certificate of a real TLS client, on fresh connections to both workers), with no
  failed request meanwhile; a certificate that does not match its key is refused and the
  old one kept.
* TLS 1.3 and 1.2 with ECDHE-AEAD are served; TLS 1.1 and a TLS 1.2 CBC cipher are
  refused by the server (the client is allowed them, so the
  refusal proven is the server's).
* The plain-HTTP listener only redirects, to ``public_url`` (never to the Host sent),
  with the same path and query; a request target that is not a path gets 400; a huge
  head 431.
* ``sso-gateway check`` validates the pair: a key that does not match, a missing file,
  and a certificate about to expire.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import signal
import socket
import ssl
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.cli import main
from gateway.demo.stack import prepare
from gateway.tls import new_context
from tests.conftest import bound_socket, port_of, seed_demo_keys
from tests.test_reload import Load, serve_process

NO_VERIFY = ssl.create_default_context()
NO_VERIFY.check_hostname = False
NO_VERIFY.verify_mode = ssl.CERT_NONE


def write_pair(directory: Path, serial: int, *, days: float = 30,
               key: ec.EllipticCurvePrivateKey | None = None,
               write_key: bool = True) -> ec.EllipticCurvePrivateKey:
    """A self-signed certificate for 127.0.0.1 with ``serial`` in ``tls.crt`` (and its key
    in ``tls.key`` unless ``write_key`` is false); returns the key."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if write_key:
        (directory / "tls.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    return key


def peer_serial(url: str, context: ssl.SSLContext = NO_VERIFY) -> int:
    """The serial number of the certificate a new TLS connection to ``url`` is shown."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def handshake_error(url: str, context: ssl.SSLContext) -> str:
    try:
        peer_serial(url, context)
    except ssl.SSLError as exc:
        return str(exc)
    return ""


def client(*, version: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
    """A client that speaks exactly ``version`` (old ones too: the point is to offer them)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():  # TLS 1.1 is deprecated in Python, as it should be
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = version
    if ciphers:
        context.set_ciphers(ciphers)
    return context


def lenient_server_accepts(context: ssl.SSLContext, directory: Path) -> bool:
    """Whether ``context`` completes a handshake with a server that allows TLS 1.0 and any
    cipher (the control: the client really offers what the gateway refuses)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server.minimum_version = ssl.TLSVersion.TLSv1
    server.set_ciphers("ALL:@SECLEVEL=0")
    server.load_cert_chain(directory / "tls.crt", directory / "tls.key")
    listener = bound_socket()
    listener.listen(1)
    result: list[bool] = []

    def accept() -> None:
        conn, _ = listener.accept()
        try:
            with server.wrap_socket(conn, server_side=True):
                result.append(True)
        except (ssl.SSLError, OSError):
            result.append(False)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    with contextlib.suppress(ssl.SSLError, OSError):
        peer_serial(f"https://127.0.0.1:{port_of(listener)}", context)
    thread.join(timeout=5)
    listener.close()
    return result == [True]


def raw_request(host: str, port: int, data: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks):
                    break
        except ConnectionResetError:
            pass
    return b"".join(chunks)


def test_own_tls_rotates_refuses_old_protocols_and_redirects_http(tmp_path: Path) -> None:
    serial_a, serial_b = 0xA11CE, 0xB0B
    write_pair(tmp_path, serial_a)
    with bound_socket() as sock:
        http_port = port_of(sock)
    extra = (f'\n[server]\ntls_cert_file = "tls.crt"\ntls_key_file = "tls.key"\n'
             f'http_redirect_listen = "127.0.0.1:{http_port}"\n')
    with serve_process(tmp_path, "http://127.0.0.1:9", extra=extra, scheme="https",
                       verify=NO_VERIFY) as served:
        url = served.url
        assert {peer_serial(url) for _ in range(6)} == {serial_a}

        # Protocols: 1.3 and 1.2 (ECDHE + AEAD) yes; 1.1, and 1.2 without ECDHE, no. The
        # client allows both (security level 0), so the refusal is the server's alert.
        assert peer_serial(url, client(version=ssl.TLSVersion.TLSv1_3)) == serial_a
        assert peer_serial(url, client(version=ssl.TLSVersion.TLSv1_2)) == serial_a
        tls11 = client(version=ssl.TLSVersion.TLSv1_1, ciphers="DEFAULT:@SECLEVEL=0")
        cbc = client(version=ssl.TLSVersion.TLSv1_2,
                     ciphers="ECDHE-ECDSA-AES128-SHA256:@SECLEVEL=0")  # Python's default has it
        for refused in (tls11, cbc):
            assert lenient_server_accepts(refused, tmp_path)
            assert handshake_error(url, refused) != ""

        # Rotation under load: the next handshakes get the new certificate.
        with Load(url, {"/healthz": {200}, "/readyz": {200}}, verify=NO_VERIFY) as load:
            time.sleep(0.5)
            key_b = write_pair(tmp_path, serial_b)
            done = served.reload()
            time.sleep(0.5)
        assert done.returncode == 0, done.stdout + done.stderr
        assert load.failures == [], load.failures[:10]
        assert {peer_serial(url) for _ in range(10)} == {serial_b}

        # A certificate that does not match the key: refused by `reload` and by SIGHUP.
        write_pair(tmp_path, 0xBAD, write_key=False)  # a new key's certificate, old key
        broken = served.reload()
        assert broken.returncode == 2
        assert "the key does not belong to the certificate" in broken.stderr
        os.kill(int((tmp_path / "gateway.pid").read_text()), signal.SIGHUP)
        deadline = time.monotonic() + 10
        while served.log_text().count("the key does not belong") < 2:
            assert time.monotonic() < deadline, served.log_text()
            time.sleep(0.1)
        assert {peer_serial(url) for _ in range(10)} == {serial_b}
        write_pair(tmp_path, serial_b, key=key_b)  # put the good pair back

        # The plain-HTTP listener: a redirect to public_url, whatever the Host says.
        plain = f"http://127.0.0.1:{http_port}"
        get = httpx.get(plain + "/issues/2023-03?page=2&q=a%20b",
                        headers={"Host": "evil.example"}, timeout=5)
        assert get.status_code == 301
        assert get.headers["location"] == url + "/issues/2023-03?page=2&q=a%20b"
        post = httpx.post(plain + "/saml/acs", data={"x": "1"}, timeout=5)
        assert post.status_code == 308 and post.headers["location"] == url + "/saml/acs"
        junk = raw_request("127.0.0.1", http_port,
                           b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert junk.startswith(b"HTTP/1.1 400 "), junk
        big = raw_request("127.0.0.1", http_port, b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: "
                          + b"a" * (1024 * 1024) + b"\r\n\r\n")
        assert big.startswith(b"HTTP/1.1 431 "), big[:100]
        assert b"\r\nserver:" not in get.text.encode() + junk.lower()


def test_the_server_context_allows_tls_1_2_and_up_with_ecdhe_aead_only() -> None:
    context = new_context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 and all(n.startswith("ECDHE-") and ("GCM" in n or "CHACHA20" in n)
                         for n in tls12), tls12
    assert context.options & ssl.OP_NO_COMPRESSION and context.options & ssl.OP_NO_RENEGOTIATION


def _check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["check", "--config", str(tmp_path / "gateway.toml")])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_validates_the_tls_pair(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    seed_demo_keys(tmp_path)
    prepare(tmp_path, gateway_url="https://127.0.0.1:8443", extra_config=(
        '\n[server]\ntls_cert_file = "tls.crt"\ntls_key_file = "tls.key"\n'))
    key = write_pair(tmp_path, 1)
    code, out, err = _check(tmp_path, capsys)
    assert code == 0, err
    assert f"tls         {tmp_path / 'tls.crt'}" in out and "warning" not in out

    write_pair(tmp_path, 2, write_key=False)  # another key's certificate
    code, out, err = _check(tmp_path, capsys)
    assert code == 2 and "the key does not belong to the certificate" in err

    write_pair(tmp_path, 3, key=key, days=5)
    code, out, err = _check(tmp_path, capsys)
    assert code == 0 and "warning: [server] tls_cert_file: the certificate expires in" in out

    (tmp_path / "tls.key").unlink()
    code, out, err = _check(tmp_path, capsys)
    assert code == 2 and "tls_key_file" in err and "No such file" in err
