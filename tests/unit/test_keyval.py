import pytest

from pyfleece.errors import ConfigError
from pyfleece.keyval import parse_json_or_keyval, parse_keyval, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("512", 512),
        ("64k", 65536),
        ("64K", 65536),
        ("1M", 1 << 20),
        ("1.5G", 3 << 29),
        ("2T", 2 << 40),
        ("0", 0),
        ("10b", 10),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1.5", "-1", "1Q", "1e9", "99999999E"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


def test_keyval_nests_and_escapes() -> None:
    got = parse_keyval("driver=qcow2,file.driver=file,file.filename=a,,b.img")
    assert got == {"driver": "qcow2", "file": {"driver": "file", "filename": "a,b.img"}}


def test_keyval_lists_and_implied_key() -> None:
    got = parse_keyval("tls-creds-x509,id=t0,rules.0.op=read,rules.1.op=write", "qom-type")
    assert got == {
        "qom-type": "tls-creds-x509",
        "id": "t0",
        "rules": [{"op": "read"}, {"op": "write"}],
    }


@pytest.mark.parametrize("text", ["a=1,a=2", "a=1,a.b=2", "noequals", "=x", "l.0=a,l.2=b"])
def test_keyval_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_keyval(text)


def test_json_or_keyval() -> None:
    assert parse_json_or_keyval('{"driver": "null-co"}') == {"driver": "null-co"}
    assert parse_json_or_keyval("driver=null-co") == {"driver": "null-co"}
    with pytest.raises(ConfigError):
        parse_json_or_keyval("{broken")
