"""Opening an NBD session for the client: the socket, TLS, and the handshake up to the
transmission phase (nbd-proto.md, "Handshake", "TLS support"); also the handshake-only
queries, listing exports and metadata contexts.

TLS follows QEMU's certificate layout: the URI's ``tls-certificates`` directory holds
``ca-cert.pem`` (the CA the server's certificate must chain to) and, for servers that verify
their clients, ``client-cert.pem`` and ``client-key.pem``. Over TCP the server certificate must
match the host (or ``tls-hostname``); over a Unix socket only the chain is verified unless
``tls-hostname`` is given.

Errors: everything the network or TLS throws during the handshake becomes an ``ImageError``
naming the server; protocol violations stay ``ProtocolError``.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from pyfleece.errors import ImageError
from pyfleece.nbd.client_handshake import ExportInfo, Negotiator
from pyfleece.nbd.client_transport import PlainTransport, TlsTransport, Transport
from pyfleece.nbd.proto import Opt
from pyfleece.nbd.uri import NbdUri, parse_uri

#: How long connecting and the handshake may take by default, in seconds.
CONNECT_TIMEOUT = 30.0


def open_socket(uri: NbdUri, timeout: float) -> socket.socket:
    """Connects the socket the URI names.

    Raises:
        ImageError: the address does not resolve or the connection is refused.
    """
    if uri.transport == "unix":
        path = uri.socket or ""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as err:
            sock.close()
            reason = os.strerror(err.errno) if err.errno else str(err)
            raise ImageError(f"Failed to connect to '{uri.endpoint()}': {reason}") from err
        return sock
    try:
        sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
    except socket.gaierror as err:
        raise ImageError(f"address resolution failed for {uri.endpoint()}: {err}") from err
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise ImageError(f"Failed to connect to {uri.endpoint()}: {reason}") from err
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def start_session(sock: socket.socket, uri: NbdUri) -> tuple[Transport, Negotiator]:
    """Greets the server and upgrades to TLS when the URI asks."""
    neg = Negotiator(PlainTransport(sock), uri.endpoint())
    with _handshake_errors(neg.where):
        neg.greet()
        if uri.tls:
            ctx, hostname = tls_context(uri)
            neg.starttls()
            tls = TlsTransport(sock, ctx, hostname)
            tls.handshake()
            neg.transport = tls
    return neg.transport, neg


def negotiate_export(neg: Negotiator, uri: NbdUri, contexts: list[str]) -> ExportInfo:
    """Structured replies, metadata contexts, then GO (or EXPORT_NAME for old servers)."""
    with _handshake_errors(neg.where):
        if not neg.fixed:
            return neg.export_name(uri.export)
        structured = neg.structured_reply()
        chosen = (
            neg.meta_contexts(Opt.SET_META_CONTEXT, uri.export, contexts)
            if (structured and contexts)
            else {}
        )
        info = neg.go(uri.export) or neg.export_name(uri.export)
        info.structured, info.contexts = structured, chosen
        return info


@contextmanager
def _handshake_errors(where: str) -> Iterator[None]:
    """Turns socket and TLS failures during the handshake into clear ImageErrors."""
    try:
        yield
    except ssl.SSLCertVerificationError as err:
        raise ImageError(
            f"TLS handshake with NBD server {where} failed: {err.verify_message}"
        ) from err
    except ssl.SSLError as err:
        raise ImageError(f"TLS with NBD server {where} failed: {err.reason or err}") from err
    except TimeoutError as err:
        raise ImageError(f"NBD handshake with {where} timed out") from err
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise ImageError(f"NBD handshake with {where} failed: {reason}") from err


def tls_context(uri: NbdUri) -> tuple[ssl.SSLContext, str | None]:
    """The client TLS context for the URI's certificates, and the name to verify.

    Raises:
        ImageError: the certificate directory or its files are missing or unusable.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    certs = uri.tls_certificates
    try:
        if certs is not None:
            if not os.path.isdir(certs):
                raise ImageError(f"TLS certificates directory '{certs}' does not exist")
            ca = os.path.join(certs, "ca-cert.pem")
            if os.path.exists(ca):
                ctx.load_verify_locations(ca)
            elif uri.tls_verify_peer:
                raise ImageError(f"TLS certificates directory '{certs}' has no ca-cert.pem")
            cert = os.path.join(certs, "client-cert.pem")
            if os.path.exists(cert):
                ctx.load_cert_chain(cert, os.path.join(certs, "client-key.pem"))
        else:
            ctx.load_default_certs()
    except (OSError, ssl.SSLError) as err:
        raise ImageError(f"Cannot load TLS certificates from '{certs}': {err}") from err
    hostname = uri.tls_hostname or (uri.host if uri.transport == "tcp" else None)
    if not uri.tls_verify_peer:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif hostname is None:
        ctx.check_hostname = False  # a Unix socket: the chain is still verified
    return ctx, hostname


def list_exports(uri: str | NbdUri, *, timeout: float = CONNECT_TIMEOUT) -> list[tuple[str, str]]:
    """The server's exports, as (name, description), by NBD_OPT_LIST.

    Raises:
        ImageError, ProtocolError: as for ``NbdClient.connect``.
    """
    parsed = parse_uri(uri) if isinstance(uri, str) else uri
    with open_socket(parsed, timeout) as sock:
        _, neg = start_session(sock, parsed)
        with _handshake_errors(neg.where):
            if not neg.fixed:
                raise ImageError(f"NBD server {neg.where} cannot list exports (no fixed newstyle)")
            exports = neg.list_exports()
            neg.abort()
        return exports


def list_meta_contexts(
    uri: str | NbdUri, queries: Iterable[str] = (), *, timeout: float = CONNECT_TIMEOUT
) -> list[str]:
    """The metadata contexts the server offers on the URI's export (NBD_OPT_LIST_META_CONTEXT);
    no queries asks for all of them."""
    parsed = parse_uri(uri) if isinstance(uri, str) else uri
    with open_socket(parsed, timeout) as sock:
        _, neg = start_session(sock, parsed)
        with _handshake_errors(neg.where):
            if not (neg.fixed and neg.structured_reply()):
                return []
            found = neg.meta_contexts(Opt.LIST_META_CONTEXT, parsed.export, list(queries))
            neg.abort()
        return sorted(found)
