"""NBD URIs (NetworkBlockDevice/nbd doc/uri.md): parsing and printing.

Accepted forms::

    nbd://host[:port]/export                 TCP, no TLS
    nbds://host[:port]/export?tls-certificates=DIR
    nbd+unix:///export?socket=PATH           Unix socket, no TLS
    nbds+unix:///export?socket=PATH&tls-certificates=DIR

``nbd+tcp`` and ``nbds+tcp`` are aliases of ``nbd`` and ``nbds``. The export name is the path
without its leading ``/``, percent-decoded (``nbd://h//disk`` names ``/disk``). IPv6 literals
go in brackets; the port defaults to 10809. A socket starting with NUL (``%00``) is in Linux's
abstract namespace.

Query parameters: ``socket`` (Unix schemes only), and for TLS schemes ``tls-certificates``
(a directory in QEMU's layout: ``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem``),
``tls-hostname``, ``tls-verify-peer`` (0 or 1) and ``tls-type`` (only ``x509``). Anything
else is refused, as the URI spec asks, so that a typo is an error rather than ignored.

Invariants: a parsed ``NbdUri`` always names a usable endpoint (a Unix URI has a socket, a
TCP one a host and a valid port); the export name is valid UTF-8 without NUL and at most
``proto.MAX_STRING`` bytes; ``str(parse_uri(s))`` parses back to an equal value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from pyfleece.errors import ConfigError
from pyfleece.nbd.proto import MAX_STRING

DEFAULT_PORT = 10809
#: Longest URI we parse; far beyond any real one, short enough to bound the work.
MAX_URI = 16384

# scheme -> (transport, tls)
_SCHEMES = {
    "nbd": ("tcp", False),
    "nbd+tcp": ("tcp", False),
    "nbds": ("tcp", True),
    "nbds+tcp": ("tcp", True),
    "nbd+unix": ("unix", False),
    "nbds+unix": ("unix", True),
}
_TLS_PARAMS = ("tls-certificates", "tls-hostname", "tls-verify-peer", "tls-type")
_HOSTNAME = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=%-]+$")
_PORT = re.compile(r"^[0-9]{1,5}$")


@dataclass(frozen=True)
class NbdUri:
    """Where an NBD export is and how to reach it.

    Attributes:
        transport: "tcp" or "unix".
        export: the export name (may be empty: the server's default export).
        host, port: the TCP endpoint (host without brackets), None for Unix sockets.
        socket: the Unix socket path, None for TCP.
        tls: TLS is required (an ``nbds`` scheme).
        tls_certificates: directory with ``ca-cert.pem`` and optionally the client's
            ``client-cert.pem`` and ``client-key.pem``; None uses the system CAs.
        tls_hostname: name to verify the server certificate against (default: the host;
            none for Unix sockets, where only the chain is verified).
        tls_verify_peer: verify the server's certificate (default True).
        user: the URI's userinfo, kept for printing only.
    """

    transport: str
    export: str = ""
    host: str | None = None
    port: int | None = None
    socket: str | None = None
    tls: bool = False
    tls_certificates: str | None = None
    tls_hostname: str | None = None
    tls_verify_peer: bool = True
    user: str | None = None

    def __str__(self) -> str:
        scheme = ("nbds" if self.tls else "nbd") + ("+unix" if self.transport == "unix" else "")
        authority = f"{quote(self.user, safe='')}@" if self.user else ""
        if self.transport == "tcp":
            host = self.host or ""
            if ":" in host:
                authority += "[" + host.replace("%", "%25") + "]"
            else:
                authority += quote(host, safe="")
            if self.port != DEFAULT_PORT:
                authority += f":{self.port}"
        query = []
        if self.socket is not None:
            query.append(("socket", self.socket))
        if self.tls_certificates is not None:
            query.append(("tls-certificates", self.tls_certificates))
        if self.tls_hostname is not None:
            query.append(("tls-hostname", self.tls_hostname))
        if not self.tls_verify_peer:
            query.append(("tls-verify-peer", "0"))
        text = f"{scheme}://{authority}/{quote(self.export, safe='/')}"
        if query:
            text += "?" + "&".join(f"{k}={quote(v, safe='/')}" for k, v in query)
        return text

    def endpoint(self) -> str:
        """The server's address as a user would write it (for error messages)."""
        if self.transport == "unix":
            return repr(self.socket)[1:-1]
        host = self.host or ""
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def is_nbd_uri(text: str) -> bool:
    """Whether ``text`` starts with one of the NBD schemes (it may still be malformed)."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() in _SCHEMES


def parse_uri(text: str) -> NbdUri:
    """Parses an NBD URI.

    Raises:
        ConfigError: the text is not a valid NBD URI; the message quotes the offending part.
    """
    if len(text) > MAX_URI:
        raise ConfigError(f"NBD URI is too long ({len(text)} characters, at most {MAX_URI})")
    bad = next((ch for ch in text if ord(ch) <= 0x20 or ord(ch) == 0x7F or ord(ch) > 0x7E), None)
    if bad is not None:
        raise ConfigError(f"Invalid NBD URI {text!r}: character {bad!r} must be percent-encoded")
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise ConfigError(f"Invalid NBD URI {text!r}: expected 'nbd://', 'nbd+unix://', ...")
    transport_tls = _SCHEMES.get(scheme.lower())
    if transport_tls is None:
        known = ", ".join(sorted(_SCHEMES))
        raise ConfigError(f"Invalid NBD URI {text!r}: unknown scheme '{scheme}' (known: {known})")
    transport, tls = transport_tls
    if "#" in rest:
        raise ConfigError(f"Invalid NBD URI {text!r}: fragments ('#...') are not allowed")
    rest, _, query_text = rest.partition("?")
    authority, slash, path = rest.partition("/")
    export = _decode(path, "export name", text) if slash else ""
    if len(export.encode()) > MAX_STRING:
        raise ConfigError(f"Invalid NBD URI {text!r}: export name longer than {MAX_STRING} bytes")
    if "\0" in export:
        raise ConfigError(f"Invalid NBD URI {text!r}: the export name contains NUL")
    user, host, port = _split_authority(authority, text)
    params = _parse_query(query_text, text)
    certs, tls_host, verify = _tls_fields(params, tls, text)
    socket_path = params.pop("socket", None)
    if params:
        unknown = ", ".join(sorted(params))
        raise ConfigError(f"Invalid NBD URI {text!r}: unknown query parameter(s): {unknown}")
    if transport == "unix":
        if host or port is not None:
            raise ConfigError(
                f"Invalid NBD URI {text!r}: a Unix socket URI takes no host or port "
                f"(write {scheme}:///export?socket=PATH)"
            )
        if not socket_path:
            raise ConfigError(f"Invalid NBD URI {text!r}: missing 'socket=PATH' parameter")
        return NbdUri("unix", export, None, None, socket_path, tls, certs, tls_host, verify, user)
    if socket_path is not None:
        raise ConfigError(
            f"Invalid NBD URI {text!r}: 'socket' needs a Unix scheme (nbd+unix://, nbds+unix://)"
        )
    host = host or "localhost"
    port = port or DEFAULT_PORT
    return NbdUri("tcp", export, host, port, None, tls, certs, tls_host, verify, user)


def _decode(part: str, what: str, text: str) -> str:
    try:
        return unquote_to_bytes(part).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"Invalid NBD URI {text!r}: the {what} is not valid UTF-8") from err


def _split_authority(authority: str, text: str) -> tuple[str | None, str, int | None]:
    user: str | None = None
    if "@" in authority:
        userinfo, _, authority = authority.rpartition("@")
        if ":" in userinfo:
            raise ConfigError(f"Invalid NBD URI {text!r}: passwords in the URI are not supported")
        user = _decode(userinfo, "user name", text)
    port_text: str | None = None
    if authority.startswith("["):
        host, close, after = authority[1:].partition("]")
        if not close or not host:
            raise ConfigError(f"Invalid NBD URI {text!r}: unterminated IPv6 literal '[{host}'")
        if not re.fullmatch(r"[0-9A-Fa-f:.]+(%25[A-Za-z0-9._~-]+)?", host) or ":" not in host:
            raise ConfigError(f"Invalid NBD URI {text!r}: bad IPv6 literal '[{host}]'")
        host = host.replace("%25", "%")  # zone id, as RFC 6874 encodes it
        if after:
            if not after.startswith(":"):
                raise ConfigError(f"Invalid NBD URI {text!r}: junk after ']': '{after}'")
            port_text = after[1:]
    else:
        host, colon, port_part = authority.partition(":")
        if colon:
            port_text = port_part
        if host and not _HOSTNAME.match(host):
            raise ConfigError(f"Invalid NBD URI {text!r}: bad host name '{host}'")
        host = _decode(host, "host name", text)
    port = None if port_text is None else _port(port_text, text)
    return user, host, port


def _port(port_text: str, text: str) -> int | None:
    if port_text == "":
        return None  # "host:" means the default port, as RFC 3986 allows
    if not _PORT.match(port_text) or not 0 < int(port_text) <= 65535:
        raise ConfigError(f"Invalid NBD URI {text!r}: bad port '{port_text}'")
    return int(port_text)


def _parse_query(query_text: str, text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    if not query_text:
        return params
    for item in query_text.split("&"):
        if not item:
            continue
        key, eq, value = item.partition("=")
        key = _decode(key, "query parameter name", text)
        if not eq:
            raise ConfigError(f"Invalid NBD URI {text!r}: query parameter '{key}' has no value")
        if key in params:
            raise ConfigError(f"Invalid NBD URI {text!r}: query parameter '{key}' given twice")
        params[key] = _decode(value, f"value of '{key}'", text)
    return params


def _tls_fields(
    params: dict[str, str], tls: bool, text: str
) -> tuple[str | None, str | None, bool]:
    """Takes the TLS parameters: (certificates directory, hostname, verify peer)."""
    given = [key for key in _TLS_PARAMS if key in params]
    if given and not tls:
        raise ConfigError(
            f"Invalid NBD URI {text!r}: '{given[0]}' needs a TLS scheme (nbds://, nbds+unix://)"
        )
    tls_type = params.pop("tls-type", "x509")
    if tls_type != "x509":
        raise ConfigError(
            f"Invalid NBD URI {text!r}: tls-type '{tls_type}' is not supported (only x509)"
        )
    verify = params.pop("tls-verify-peer", "1")
    if verify not in ("0", "1"):
        raise ConfigError(
            f"Invalid NBD URI {text!r}: tls-verify-peer must be 0 or 1, not '{verify}'"
        )
    return params.pop("tls-certificates", None), params.pop("tls-hostname", None), verify == "1"
