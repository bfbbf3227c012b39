"""HOST:PORT parsing and the loopback rule both sides share."""

from __future__ import annotations

import pytest

from xkt.shared.addresses import is_loopback, split_address
from xkt.shared.errors import ConfigError


def test_split_address_accepts_names_ipv4_and_bracketed_ipv6() -> None:
    assert split_address("owner.example.org:50051", option="--server", example="x") == ("owner.example.org", 50051)
    assert split_address("[::1]:443", option="--server", example="x") == ("::1", 443)
    assert split_address("127.0.0.1:0", option="--listen", example="x", allow_port_zero=True) == ("127.0.0.1", 0)


@pytest.mark.parametrize("bad", ["owner", "owner:", ":50051", "owner:http", "owner:70000", "owner:0"])
def test_split_address_names_the_option_and_the_form(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        split_address(bad, option="--server", example="owner.example.org:50051")
    assert caught.value.message.startswith("--server") and caught.value.reason == "bad-server-address"
    assert "owner.example.org:50051" in caught.value.hint


def test_only_loopback_addresses_count_as_loopback() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.10", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "::", "owner.example.org", "localhost.evil.org"))
