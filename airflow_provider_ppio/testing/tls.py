"""Throwaway certificates so the emulator can serve HTTPS in tests.

:func:`create_tls_files` makes a fresh certificate authority and a server certificate for the
loopback names signed by it, and writes them as PEM files. Trusting the CA file (``verify=``,
``REQUESTS_CA_BUNDLE``, ``SSL_CERT_FILE``, a connection's ``ca_bundle`` extra) makes the
emulator's certificate verify; without it, verification fails as it would for any unknown CA.

The CA's private key is never written anywhere and is forgotten once the server certificate is
signed, so nothing else can ever be signed by a CA a test was told to trust.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DEFAULT_TLS_HOSTS", "EmulatorTLS", "create_tls_files"]

#: Names the server certificate always covers: what a client on the same machine dials.
DEFAULT_TLS_HOSTS = ("localhost", "127.0.0.1", "::1")
#: Listening on every interface says nothing about the name a client will use.
_UNSPECIFIED = frozenset({"", "0.0.0.0", "::"})


@dataclasses.dataclass(frozen=True)
class EmulatorTLS:
    """The PEM files of one emulator's HTTPS setup.

    :param directory: where the files are.
    :param ca_bundle: the CA certificate to trust (what a client passes as ``verify=`` or
        ``REQUESTS_CA_BUNDLE`` / ``SSL_CERT_FILE``).
    :param certfile: the server certificate.
    :param keyfile: the server's private key (mode 0600).
    :param hosts: the DNS names and IP addresses the server certificate covers.
    """

    directory: Path
    ca_bundle: Path
    certfile: Path
    keyfile: Path
    hosts: tuple[str, ...]


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)  # the mode given to os.open applies only to a new file


def create_tls_files(
    directory: str | os.PathLike[str], hosts: Iterable[str] = (), *, valid_days: int = 7
) -> EmulatorTLS:
    """Create a fresh CA and a server certificate signed by it, and write them to ``directory``.

    Files: ``ca.pem`` (CA certificate), ``cert.pem`` (server certificate), ``key.pem`` (server key).
    Existing files of those names are replaced.

    :param directory: an existing directory.
    :param hosts: names or addresses to cover besides :data:`DEFAULT_TLS_HOSTS`; wildcard
        listen addresses (``0.0.0.0``, ``::``) are skipped.
    :param valid_days: how long the certificates are valid (they start an hour in the past, so a
        slightly slow clock still accepts them).
    :return: the paths.
    """
    folder = Path(directory)
    names = tuple(dict.fromkeys(h for h in (*DEFAULT_TLS_HOSTS, *hosts) if h not in _UNSPECIFIED))
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "airflow-provider-ppio emulator"),
            # Unique per run: two emulators' CAs are never mistaken for one another.
            x509.NameAttribute(NameOID.COMMON_NAME, f"PPIO emulator test CA {secrets.token_hex(4)}"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    tls = EmulatorTLS(
        directory=folder,
        ca_bundle=folder / "ca.pem",
        certfile=folder / "cert.pem",
        keyfile=folder / "key.pem",
        hosts=names,
    )
    _write(tls.ca_bundle, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(tls.certfile, cert.public_bytes(serialization.Encoding.PEM))
    _write(
        tls.keyfile,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        0o600,
    )
    return tls
