"""The ports Meadow's processes listen on. A port asked for by number is taken only if it is free: p2pd binds its
port with SO_REUSEPORT, so a second node started on a port in use would share it with the first, each getting some of
the connections meant for the other, instead of failing."""

from __future__ import annotations

import errno
import socket

from meadow.wire import MeadowError


class CannotListen(MeadowError):
    """The address asked for cannot be listened on: its port is taken, or the host is not one of this machine's."""


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (any free port for 0) and listening; CannotListen if it cannot be."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port a stopped process left in TIME_WAIT is free
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = "; choose another --port (0: any free one)" if e.errno == errno.EADDRINUSE else ""
        raise CannotListen(f"cannot listen on {host} port {port}: {e.strerror}{hint}") from None
    sock.listen(128)  # connections wait in the backlog until the server accepts them
    return sock


def check_port_free(host: str, port: int) -> None:
    """CannotListen if host:port cannot be listened on, a process listening there, say (nothing to check for port 0:
    the system picks a free one)."""
    if port:
        listening_socket(host, port).close()
