"""A real redis-server that speaks only TLS, with a certificate authority made for the test.

`TlsRedis(dir).start()` writes a CA and a server certificate for 127.0.0.1/localhost signed by
it, starts `redis-server --port 0 --tls-port P` (no plaintext port at all, so nothing can pass
by TLS unnoticed), and gives `rediss://` URLs that trust that CA. Clients need no certificate of
their own (`--tls-auth-clients no`), as with most managed Redis offerings.
"""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from instructloop.redis_server import free_port, is_reachable, redis_binary

_CA_KEY_USAGE = {
    **dict.fromkeys(("digital_signature", "key_cert_sign", "crl_sign"), True),
    **dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement"), False
    ),
    **dict.fromkeys(("encipher_only", "decipher_only"), False),
}


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )


def make_ca_and_server_cert(out: Path) -> tuple[Path, Path, Path]:
    """(ca.crt, server.crt, server.key) in `out`: a self-signed CA and a server certificate
    it signed, valid for 127.0.0.1 and localhost for a day."""
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("instructloop test CA"))
        .issuer_name(_name("instructloop test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(**_CA_KEY_USAGE), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = out / "ca.crt", out / "server.crt", out / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return ca_path, cert_path, key_path


@dataclass
class TlsRedis:
    """A private redis-server on a TLS port only (no AOF: these tests are about transport)."""

    dir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def url(self, db: int = 0, **query: str) -> str:
        """A rediss:// URL that trusts the test CA (and checks the server against it)."""
        assert self.ca is not None, "start() first"
        q = {"ssl_ca_certs": str(self.ca), "ssl_cert_reqs": "required", **query}
        return f"rediss://127.0.0.1:{self.port}/{db}?{urllib.parse.urlencode(q, safe='/')}"

    def start(self, timeout: float = 10.0) -> TlsRedis:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.ca is None:
            self.ca, self.cert, self.key = make_ca_and_server_cert(self.dir / "tls")
        if not self.port:
            self.port = free_port()
        log = self.dir / "redis.log"
        cmd = [
            redis_binary(),
            "--bind", "127.0.0.1",
            "--port", "0",
            "--tls-port", str(self.port),
            "--tls-cert-file", str(self.cert),
            "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.ca),
            "--tls-auth-clients", "no",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "no",
        ]  # fmt: skip
        with log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = log.read_text(errors="replace")
                if "Bad directive" in text and "tls-port" in text:
                    pytest.skip(f"{cmd[0]} was built without TLS support")
                raise RuntimeError(f"redis-server exited early:\n{text[-2000:]}")
            if is_reachable(self.url(), timeout=0.5):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"TLS redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
