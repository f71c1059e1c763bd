"""TLS credentials in QEMU's ``tls-creds-x509`` form: a directory of PEM files.

``--object tls-creds-x509,id=tls0,endpoint=server,dir=/etc/pki/qemu,verify-peer=on`` names
a directory holding ``ca-cert.pem`` (always required), ``server-cert.pem`` and
``server-key.pem`` (server endpoint) or ``client-cert.pem`` and ``client-key.pem`` (client
endpoint, optional unless the server verifies peers). ``verify-peer`` defaults to on, as in
QEMU: a server then requires a client certificate signed by the CA.
"""

from __future__ import annotations

import errno
import os
import ssl
from dataclasses import dataclass
from typing import Any

from pyfleece.errors import ConfigError
from pyfleece.keyval import parse_json_or_keyval

_BOOLS = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}
_KNOWN = frozenset({"qom-type", "id", "endpoint", "dir", "verify-peer", "priority", "loaded"})


@dataclass(frozen=True)
class TlsCredsX509:
    """One ``tls-creds-x509`` object."""

    id: str
    endpoint: str
    dir: str
    verify_peer: bool = True
    priority: str | None = None

    def _optional(self, name: str) -> str | None:
        path = os.path.join(self.dir, name)
        return path if os.access(path, os.R_OK) else None

    def _required(self, name: str) -> str:
        path = self._optional(name)
        if path is None:
            path = os.path.join(self.dir, name)
            reason = os.strerror(errno.ENOENT if not os.path.exists(path) else errno.EACCES)
            raise ConfigError(f"Unable to access credentials {path}: {reason}")
        return path

    def server_context(self) -> ssl.SSLContext:
        """The SSL context a server uses with these credentials.

        Raises:
            ConfigError: the endpoint is not ``server``, or a file is missing or unusable.
        """
        if self.endpoint != "server":
            raise ConfigError("Expecting TLS credentials with a server endpoint")
        ca = self._required("ca-cert.pem")
        cert = self._required("server-cert.pem")
        key = self._required("server-key.pem")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.num_tickets = 0  # nothing resumes NBD sessions; do not send tickets
        _load(ctx, ca, cert, key)
        ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        return ctx

    def client_context(self, *, check_hostname: bool = True) -> ssl.SSLContext:
        """The SSL context a client uses: trusts the CA, presents its certificate if any.

        Raises:
            ConfigError: the endpoint is not ``client``, or a file is missing or unusable.
        """
        if self.endpoint != "client":
            raise ConfigError("Expecting TLS credentials with a client endpoint")
        ca = self._required("ca-cert.pem")
        cert = self._optional("client-cert.pem")
        key = self._required("client-key.pem") if cert is not None else None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = check_hostname and self.verify_peer
        ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        _load(ctx, ca, cert, key)
        return ctx


def _load(ctx: ssl.SSLContext, ca: str, cert: str | None, key: str | None) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"Unable to load CA certificate {ca}: {err}") from err
    if cert is None or key is None:
        return
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"Unable to load certificate {cert} and key {key}: {err}") from err


def parse_object(text: str) -> dict[str, Any]:
    """Parses an ``--object`` argument (keyval with ``qom-type`` implied, or JSON).

    Raises:
        ConfigError: malformed text, or no ``qom-type``/``id``.
    """
    props = parse_json_or_keyval(text, implied_key="qom-type")
    if "qom-type" not in props:
        raise ConfigError("Parameter 'qom-type' is missing")
    if "id" not in props:
        raise ConfigError("Parameter 'id' is missing")
    return props


def creds_from_object(props: dict[str, Any]) -> TlsCredsX509:
    """Builds credentials from a parsed ``--object`` of type ``tls-creds-x509``.

    Raises:
        ConfigError: another object type, an unknown property or a bad value.
    """
    kind = props.get("qom-type")
    if kind != "tls-creds-x509":
        raise ConfigError(f"Parameter 'qom-type' does not accept value '{kind}'")
    for key in props:
        if key not in _KNOWN:
            raise ConfigError(f"Property 'tls-creds-x509.{key}' not found")
    endpoint = str(props.get("endpoint", "client"))
    if endpoint not in ("server", "client"):
        raise ConfigError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
    if "dir" not in props:
        raise ConfigError("Parameter 'dir' is missing")
    return TlsCredsX509(
        id=str(props["id"]),
        endpoint=endpoint,
        dir=str(props["dir"]),
        verify_peer=_bool(props.get("verify-peer", True), "verify-peer"),
        priority=None if props.get("priority") is None else str(props["priority"]),
    )


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    parsed = _BOOLS.get(str(value).lower())
    if parsed is None:
        raise ConfigError(f"Parameter '{name}' expects 'on' or 'off'")
    return parsed
