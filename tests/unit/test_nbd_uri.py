"""NBD URIs: the forms of the URI spec parse to the right endpoint; malformed and hostile
input gets a ConfigError naming the problem; printing and parsing round-trip."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyfleece.errors import ConfigError
from pyfleece.nbd.uri import MAX_URI, NbdUri, is_nbd_uri, parse_uri

VALID = [
    # (uri, transport, host, port, socket, export, tls)
    ("nbd://example.com", "tcp", "example.com", 10809, None, "", False),
    ("nbd://example.com/", "tcp", "example.com", 10809, None, "", False),
    ("nbd://example.com:10810/disk", "tcp", "example.com", 10810, None, "disk", False),
    ("nbd://example.com//disk", "tcp", "example.com", 10809, None, "/disk", False),
    ("nbd://example.com/hello%20world", "tcp", "example.com", 10809, None, "hello world", False),
    ("nbd://h/caf%C3%A9", "tcp", "h", 10809, None, "café", False),
    ("nbd://h:/x", "tcp", "h", 10809, None, "x", False),
    ("nbd://[::1]:4000/a", "tcp", "::1", 4000, None, "a", False),
    ("nbd://[fe80::1%25eth0]/a", "tcp", "fe80::1%eth0", 10809, None, "a", False),
    ("nbd://127.0.0.1/a", "tcp", "127.0.0.1", 10809, None, "a", False),
    ("nbd:///a", "tcp", "localhost", 10809, None, "a", False),
    ("nbd+tcp://h/a", "tcp", "h", 10809, None, "a", False),
    ("NBD://h/a", "tcp", "h", 10809, None, "a", False),
    ("nbds://h/a", "tcp", "h", 10809, None, "a", True),
    ("nbd+unix:///disk?socket=/tmp/s.sock", "unix", None, None, "/tmp/s.sock", "disk", False),
    ("nbd+unix://?socket=rel.sock", "unix", None, None, "rel.sock", "", False),
    ("nbd+unix:///?socket=/a%26b%3Dc", "unix", None, None, "/a&b=c", "", False),
    ("nbd+unix:///?socket=/a+b", "unix", None, None, "/a+b", "", False),
    ("nbd+unix:///?socket=%00/abstract", "unix", None, None, "\0/abstract", "", False),
    ("nbds+unix://alice@/?socket=/s", "unix", None, None, "/s", "", True),
]


@pytest.mark.parametrize(
    ("text", "transport", "host", "port", "sock", "export", "tls"),
    VALID,
    ids=[v[0] for v in VALID],
)
def test_valid(
    text: str,
    transport: str,
    host: str | None,
    port: int | None,
    sock: str | None,
    export: str,
    tls: bool,
) -> None:
    uri = parse_uri(text)
    assert (uri.transport, uri.host, uri.port, uri.socket, uri.export, uri.tls) == (
        transport,
        host,
        port,
        sock,
        export,
        tls,
    )
    assert is_nbd_uri(text)
    assert parse_uri(str(uri)) == uri


def test_tls_parameters() -> None:
    uri = parse_uri(
        "nbds+unix:///x?socket=/s&tls-certificates=/etc/pki/c&tls-hostname=srv&tls-verify-peer=0"
    )
    assert uri.tls_certificates == "/etc/pki/c"
    assert uri.tls_hostname == "srv"
    assert uri.tls_verify_peer is False
    assert parse_uri(str(uri)) == uri
    assert parse_uri("nbds://h/?tls-type=x509").tls_verify_peer is True


INVALID = [
    ("", "expected 'nbd://'"),
    ("/tmp/disk.img", "expected 'nbd://'"),
    ("http://h/x", "unknown scheme 'http'"),
    ("nbd+vsock:///", "unknown scheme 'nbd+vsock'"),
    ("nbd:/h/x", "expected 'nbd://'"),
    ("nbd://h:0/x", "bad port '0'"),
    ("nbd://h:65536/x", "bad port '65536'"),
    ("nbd://h:12a/x", "bad port '12a'"),
    ("nbd://h:-1/x", "bad port '-1'"),
    ("nbd://h:99999999999999999999/x", "bad port"),
    ("nbd://[::1/x", "unterminated IPv6 literal"),
    ("nbd://[]/x", "unterminated IPv6 literal"),
    ("nbd://[zz::1]/x", "bad IPv6 literal"),
    ("nbd://[::1]x/y", "junk after ']'"),
    ("nbd://a[b]/x", "bad host name"),
    ("nbd://user:secret@h/x", "passwords"),
    ("nbd://h/x#frag", "fragments"),
    ("nbd://h/a b", "must be percent-encoded"),
    ("nbd://h/a\nb", "must be percent-encoded"),
    ("nbd://h/caf\u00e9", "must be percent-encoded"),
    ("nbd://h/%ff%fe", "not valid UTF-8"),
    ("nbd://h/a%00b", "contains NUL"),
    ("nbd://h/" + "%41" * 4097, "longer than 4096 bytes"),
    ("nbd://h/x?socket=/s", "'socket' needs a Unix scheme"),
    ("nbd+unix:///x", "missing 'socket=PATH'"),
    ("nbd+unix:///x?socket=", "missing 'socket=PATH'"),
    ("nbd+unix://host/x?socket=/s", "takes no host or port"),
    ("nbd+unix://:99/x?socket=/s", "takes no host or port"),
    ("nbd+unix:///x?socket=/s&socket=/t", "given twice"),
    ("nbd+unix:///x?socket", "has no value"),
    ("nbd+unix:///x?socket=/s&bogus=1", "unknown query parameter(s): bogus"),
    ("nbd://h/x?tls-certificates=/c", "needs a TLS scheme"),
    ("nbds://h/x?tls-type=psk", "tls-type 'psk' is not supported"),
    ("nbds://h/x?tls-verify-peer=yes", "tls-verify-peer must be 0 or 1"),
    ("nbd://h/%zz", None),  # a lone '%' is kept literally by percent-decoding
]


@pytest.mark.parametrize(("text", "message"), INVALID, ids=[repr(v[0])[:40] for v in INVALID])
def test_invalid(text: str, message: str | None) -> None:
    if message is None:
        assert parse_uri(text).export == "%zz"
        return
    with pytest.raises(ConfigError) as info:
        parse_uri(text)
    assert message in str(info.value)
    assert "NBD URI" in str(info.value)


def test_too_long_is_refused_before_parsing() -> None:
    with pytest.raises(ConfigError, match="too long"):
        parse_uri("nbd://h/" + "a" * MAX_URI)


def test_endpoint_for_messages() -> None:
    assert parse_uri("nbd://[::1]:99/x").endpoint() == "[::1]:99"
    assert parse_uri("nbd://h/x").endpoint() == "h:10809"
    assert parse_uri("nbd+unix:///?socket=/run/s").endpoint() == "/run/s"
    assert parse_uri("nbd+unix:///?socket=%00abs").endpoint() == "\\x00abs"


_text = st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]), max_size=40)


@given(export=_text, sock=_text.filter(bool), tls=st.booleans())
def test_unix_round_trip(export: str, sock: str, tls: bool) -> None:
    """Any export name and socket path survives printing and parsing."""
    uri = NbdUri("unix", export, socket=sock, tls=tls)
    assert parse_uri(str(uri)) == uri


@given(
    export=_text,
    host=st.sampled_from(["h", "::1", "10.0.0.1", "a-b.example"]),
    port=st.integers(1, 65535),
)
def test_tcp_round_trip(export: str, host: str, port: int) -> None:
    uri = NbdUri("tcp", export, host, port)
    assert parse_uri(str(uri)) == uri
