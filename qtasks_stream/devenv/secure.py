"""The secrets of a secured dev broker: a local CA, the broker's certificate, SCRAM passwords.

Made once, at the first ``dev up --secure`` of a home, with the ``cryptography`` package
(no JVM start per step, as keytool would need), and kept under ``<kafka home>/secure``::

    ca.pem              the CA certificate clients trust (QTASKS_SSL_CAFILE)
    ca.key              the CA's private key (kept to sign a new broker certificate)
    broker.p12          the broker's key and certificate chain, PKCS#12
    keystore.password   the PKCS#12 password
    <user>.password     each SCRAM user's password (admin, app, reader)
    <user>.registry     ``<user>:<password>`` for the schema registry's basic auth
                        (QTASKS_SCHEMA_REGISTRY_AUTH_FILE): the same user and password
    registry-users.properties
                        the registry's users and roles (Quarkus' embedded users), rewritten
                        by every registry start from the password files

Every file is mode 0600 in a 0700 folder: the passwords are read from files, never printed.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from qtasks_stream.errors import DevEnvError

__all__ = [
    "ADMIN_USER",
    "APP_USER",
    "READER_USER",
    "REGISTRY_ROLES",
    "SCRAM_MECHANISM",
    "USERS",
    "DevSecrets",
]

#: The broker's own principal (inter-broker and controller), a super user.
ADMIN_USER: Final = "admin"
#: The principal the exports hand to the app; it gets no ACL until `acl grant`.
APP_USER: Final = "app"
#: A principal for another team's reader; no ACL until `acl grant --role reader`.
READER_USER: Final = "reader"
#: Every user of a secured dev environment: a SCRAM user of the broker and a registry user.
USERS: Final = (ADMIN_USER, APP_USER, READER_USER)
#: Each user's Apicurio Registry role: the admin may change global settings, the app
#: registers schemas and sets its subjects' compatibility, the reader only reads.
REGISTRY_ROLES: Final = {
    ADMIN_USER: "sr-admin",
    APP_USER: "sr-developer",
    READER_USER: "sr-readonly",
}
SCRAM_MECHANISM: Final = "SCRAM-SHA-512"
_VALID_DAYS: Final = 825
# What the registry's users file carries as it is (secrets.token_urlsafe's alphabet and more).
_PLAIN_PASSWORD: Final = re.compile(r"[A-Za-z0-9._~-]+")


@dataclass(frozen=True, slots=True)
class DevSecrets:
    """The files of one secured dev broker, made on first use by :meth:`ensure`."""

    folder: Path

    @property
    def ca_file(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def keystore(self) -> Path:
        return self.folder / "broker.p12"

    def password_file(self, user: str) -> Path:
        return self.folder / f"{user}.password"

    def registry_auth_file(self, user: str) -> Path:
        """``user:password`` for the schema registry (QTASKS_SCHEMA_REGISTRY_AUTH_FILE)."""
        return self.folder / f"{user}.registry"

    @property
    def registry_users_file(self) -> Path:
        """The registry's users, passwords and roles, as Quarkus properties."""
        return self.folder / "registry-users.properties"

    def password(self, user: str) -> str:
        try:
            return self.password_file(user).read_text(encoding="utf-8").strip()
        except FileNotFoundError as exc:
            raise DevEnvError(
                f"no password for {user!r} in {self.folder}: was the broker started with --secure?"
            ) from exc

    @property
    def keystore_password(self) -> str:
        return (self.folder / "keystore.password").read_text(encoding="utf-8").strip()

    def ensure(self) -> None:
        """Make what is missing: passwords, the CA, the broker certificate."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        for user in (*USERS, "keystore"):
            path = self.folder / f"{user}.password"
            if not path.is_file():
                _write_private(path, secrets.token_urlsafe(24) + "\n")
        if not (self.ca_file.is_file() and self.keystore.is_file()):
            self._make_certificates()

    def write_registry_users(self) -> Path:
        """Write each user's registry auth file and the registry's users file from the
        current passwords (a password changed in its file reaches both); return the latter.
        """
        self.ensure()
        lines = []
        for user in USERS:
            password = self.password(user)
            if not _PLAIN_PASSWORD.fullmatch(password):
                # Quarkus' config would read '\\', '$' and '${...}' in it as escapes.
                raise DevEnvError(
                    f"the password in {self.password_file(user)} may hold only letters, digits "
                    "and '-_.~' (the registry's properties file cannot carry it otherwise)"
                )
            _write_private(self.registry_auth_file(user), f"{user}:{password}\n")
            lines += [
                f"quarkus.security.users.embedded.users.{user}={password}",
                f"quarkus.security.users.embedded.roles.{user}={REGISTRY_ROLES[user]}",
            ]
        _write_private(self.registry_users_file, "\n".join(lines) + "\n")
        return self.registry_users_file

    def _make_certificates(self) -> None:
        try:
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import ec
            from cryptography.hazmat.primitives.serialization import pkcs12
            from cryptography.x509.oid import NameOID
        except ImportError as exc:  # pragma: no cover - a dev extra
            raise DevEnvError(
                "dev up --secure needs the cryptography package (pip install cryptography)"
            ) from exc
        now = datetime.datetime.now(datetime.UTC)
        until = now + datetime.timedelta(days=_VALID_DAYS)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qtasks-stream dev CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
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
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        # The clients connect to 127.0.0.1 and check the name (https identification).
        names = x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(until)
            .add_extension(names, critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        store = pkcs12.serialize_key_and_certificates(
            b"broker",
            key,
            cert,
            [ca_cert],
            serialization.BestAvailableEncryption(self.keystore_password.encode()),
        )
        _write_private(
            self.folder / "ca.key",
            ca_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode("ascii"),
        )
        _write_private(self.keystore, store)
        _write_private(self.ca_file, ca_cert.public_bytes(serialization.Encoding.PEM).decode())


def _write_private(path: Path, content: str | bytes) -> None:
    """Write ``path`` readable by its owner only, from the first byte."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
