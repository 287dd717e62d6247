"""Keys and certificates for a Flower deployment, in the formats Flower 1.42 reads.

- A CA (`ca.crt`, `ca.key`): EC P-384, self-signed, BasicConstraints ca=True. The SuperLink
  gets it as `--ssl-ca-certfile`, SuperNodes and the `flwr` CLI as their root certificate.
- The SuperLink's server certificate (`server.pem`, `server.key`, PEM / PKCS8), signed by the
  CA, with SAN DNS:localhost, IP:127.0.0.1, IP:::1 by default (the hosts clients dial) and
  EKU serverAuth: `flower-superlink --ssl-certfile server.pem --ssl-keyfile server.key`.
- One EC key pair per SuperNode in OpenSSH encodings: the private key (`node_00`, read by
  `flower-supernode --auth-supernode-private-key` with `load_ssh_private_key`; it must be EC)
  and the public key (`node_00.pub`, `ecdsa-sha2-nistp384 AAAA...`, which
  `flwr supernode register` reads with `load_ssh_public_key`; it must be on a NIST curve).
  `ssh-keygen -t ecdsa -b 384 -N "" -f node_00` makes the same pair.

These are for demos and tests (a CA that lives next to its certificates). A real deployment
uses certificates from the coordinator's own CA, and each hospital makes its own node key
pair and sends only the `.pub` file.

Private keys are created with mode 0600 (never world-readable, not even briefly), in a fresh file
opened with O_EXCL | O_NOFOLLOW (a symbolic link planted at a key's path is refused, never followed).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CURVE = ec.SECP384R1


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's authentication key pair on disk."""

    private: Path  # OpenSSH private key: --auth-supernode-private-key
    public: Path  # OpenSSH public key: flwr supernode register <public>


@dataclass(frozen=True)
class DemoPKI:
    """Paths of a generated demo PKI (see write_demo_pki)."""

    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    nodes: tuple[NodeKey, ...]


class KeyWriteError(OSError):
    """A key or certificate path that must not be written through (a symbolic link)."""


def _write_fresh(path: Path, data: bytes, mode: int) -> None:
    """Write `data` into a new file beside `path` with `mode` from its creation, then rename it
    onto `path`. The temporary name is random and opened with O_EXCL | O_NOFOLLOW, so a file or
    symbolic link planted in advance is never written through; a symbolic link at `path` itself
    is refused (rename would replace it, but a planted link means someone is tampering here)."""
    path = Path(path)
    if path.is_symlink():
        raise KeyWriteError(f"{path} is a symbolic link; refusing to write a key or certificate through it")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")
    fd = os.open(tmp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed a public file's mode; never widens a key's
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_private(path: Path, data: bytes) -> None:
    """Write a secret with mode 0600 from the start (umask cannot widen it) into a fresh file."""
    _write_fresh(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Write a certificate or public key (mode 0644) the same way: never through a planted link."""
    _write_fresh(path, data, 0o644)


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def make_ca(
    common_name: str = "MultiMed-FL demo CA", days: int = 30
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 30
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for the SuperLink, valid for `hosts` (IPs and DNS names)."""
    if not hosts:
        raise ValueError("a server certificate needs at least one host name or IP address")
    key = ec.generate_private_key(CURVE())
    not_before, not_after = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_node_keypair() -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key line) of a new EC P-384 SuperNode key."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def write_node_key(directory: Path, name: str) -> NodeKey:
    private, public = make_node_keypair()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = NodeKey(directory / name, directory / f"{name}.pub")
    write_private(key.private, private)
    write_public(key.public, public)
    return key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_demo_pki(
    directory: str | Path, n_nodes: int, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 30
) -> DemoPKI:
    """Write a CA, a SuperLink certificate for `hosts` and `n_nodes` SuperNode key pairs
    (node_00, node_01, ...) into `directory` (created with mode 0700)."""
    if n_nodes < 0:
        raise ValueError(f"n_nodes must be >= 0 (got {n_nodes})")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    ca_key, ca_cert = make_ca(days=days)
    srv_key, srv_cert = make_server_cert(ca_key, ca_cert, hosts, days=days)
    pki = DemoPKI(
        d,
        d / "ca.crt",
        d / "ca.key",
        d / "server.pem",
        d / "server.key",
        tuple(write_node_key(d, f"node_{i:02d}") for i in range(n_nodes)),
    )
    write_public(pki.ca_cert, _pem(ca_cert))
    write_private(pki.ca_key, _pkcs8(ca_key))
    write_public(pki.server_cert, _pem(srv_cert))
    write_private(pki.server_key, _pkcs8(srv_key))
    return pki


def write_server_pki(directory: str | Path, hosts: Sequence[str], days: int = 365) -> DemoPKI:
    """A CA and a SuperLink certificate for `hosts` (the names hospitals dial), for a
    coordinator without a CA of its own; no node keys (each hospital makes its own)."""
    return write_demo_pki(directory, 0, hosts, days)
