"""On PYTHONPATH, this makes the interpreter unable to reach anything but loopback: the tests
of model sources run the CLI with it to show that no command calls a hub."""

import socket

_connect = socket.socket.connect


def _loopback_only(self, address):  # noqa: ANN001, ANN202 - socket's own signature
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
        raise OSError(f"network disabled by the vitdeploy tests (tried to reach {host})")
    return _connect(self, address)


socket.socket.connect = _loopback_only
