"""--chardev and --monitor as qemu-storage-daemon reads them."""

from __future__ import annotations

import pytest

from pyfleece.errors import ConfigError
from pyfleece.monitor.options import ChardevSpec, MonitorSpec, parse_chardev, parse_monitor


def test_chardev_forms() -> None:
    assert parse_chardev("socket,path=/run/q.sock,server=on,wait=off,id=m") == ChardevSpec(
        "m", path="/run/q.sock"
    )
    assert parse_chardev("socket,id=m,path=/a,,b,server,nowait") == ChardevSpec("m", path="/a,b")
    assert parse_chardev("socket,id=t,host=127.0.0.1,port=4444,server=on,wait=off") == (
        ChardevSpec("t", host="127.0.0.1", port=4444)
    )
    assert parse_chardev("socket,id=t,port=0,server=on,wait=off,ipv4=on").port == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("foo,id=m", "'foo' is not a valid char driver name"),
        ("socket,path=/a,server=on,wait=off", "chardev: no id specified"),
        ("socket,id=m,path=/a,server=on,wait=off,bogus=1", "Invalid parameter 'bogus'"),
        ("socket,id=m,path=/a,server=maybe,wait=off", "Parameter 'server' expects 'on' or 'off'"),
        ("socket,id=m,path=/a,server=off", "only listening sockets"),
        ("socket,id=m,path=/a,server=on", "only wait=off"),
        ("socket,id=m,server=on,wait=off", "needs path= or port="),
        ("socket,id=m,port=x,server=on,wait=off", "port 'x' is not a number"),
        ("socket,id=m,path=/a,port=1,server=on,wait=off", "either path= or host=/port="),
    ],
)
def test_chardev_errors(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        parse_chardev(text)


def test_monitor_forms() -> None:
    assert parse_monitor("m") == MonitorSpec("m")
    assert parse_monitor("chardev=m,mode=readline") == MonitorSpec("m", mode="readline")
    assert parse_monitor("m,pretty=on,id=mon0") == MonitorSpec("m", pretty=True, id="mon0")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("m,mode=bogus", "Parameter 'mode' does not accept value 'bogus'"),
        ("m,pretty=maybe", "Parameter 'pretty' expects 'on' or 'off'"),
        ("m,x=1", "Parameter 'x' is unexpected"),
        ("mode=control", "Parameter 'chardev' is missing"),
        ("m,pretty", "Expected '=' after parameter 'pretty'"),
    ],
)
def test_monitor_errors(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_monitor(text)


def test_server_plan_errors() -> None:
    from pyfleece.monitor.core import create_dispatcher
    from pyfleece.monitor.server import MonitorServer

    chardevs = [ChardevSpec("a", path="/nonexistent/a.sock")]
    with pytest.raises(ConfigError, match='chardev "b" not found'):
        MonitorServer(create_dispatcher(), None, [MonitorSpec("b")], chardevs)
    with pytest.raises(ConfigError, match="already used by another monitor"):
        MonitorServer(create_dispatcher(), None, [MonitorSpec("a"), MonitorSpec("a")], chardevs)
    with pytest.raises(ConfigError, match="duplicate chardev id"):
        MonitorServer(create_dispatcher(), None, [], chardevs * 2)
    server = MonitorServer(create_dispatcher(), None, [MonitorSpec("a")], chardevs)
    with pytest.raises(ConfigError, match=r"Failed to bind socket to /nonexistent/a\.sock"):
        server.start()
    server.stop()  # harmless after a failed start
