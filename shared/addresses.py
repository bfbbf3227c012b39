"""``HOST:PORT`` parsing and the loopback rule, shared by the server's --listen and the client's --server.

Plaintext is allowed only where traffic cannot leave the machine, so both sides must
agree exactly on what "loopback" means; one function decides it for both.
"""

from __future__ import annotations

import ipaddress

from xkt.shared.errors import ConfigError


def split_address(address: str, *, option: str, example: str, allow_port_zero: bool = False) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); a ConfigError names the option and the expected form."""
    host, sep, port = address.rpartition(":")
    lowest = 0 if allow_port_zero else 1
    if not sep or not host or not port.isdigit() or not lowest <= int(port) < 65536:
        raise ConfigError(
            f"{option} {address!r} is not HOST:PORT",
            hint=f"for example {example}",
            reason=f"bad-{option.strip('-')}-address",
        )
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """True only for names and addresses that cannot leave this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
