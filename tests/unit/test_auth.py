"""Site authentication (xkt.server.auth): token file, hashing, and identity resolution."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from xkt.server.auth import (
    ANONYMOUS,
    AuthInterceptor,
    _with_site,
    add_token,
    certificate_identity,
    current_site,
    hash_token,
    load_tokens,
    parse_tokens,
)
from xkt.shared.errors import ConfigError


def test_add_token_stores_only_the_hash(tmp_path: Path) -> None:
    path = tmp_path / "tokens.txt"
    token_a, token_b = add_token(path, "site-a"), add_token(path, "site-b")
    text = path.read_text()
    assert token_a not in text and token_b not in text and hash_token(token_a) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store = load_tokens(path)
    assert store.identify(token_a) == "site-a" and store.identify(token_b) == "site-b"
    assert store.identify(token_a + "x") is None and store.identify("") is None


def test_add_token_refuses_duplicates_and_bad_ids(tmp_path: Path) -> None:
    add_token(tmp_path / "t", "site-a")
    for site, reason in (("site-a", "site-exists"), ("bad id", "bad-site-id"), ("-x", "bad-site-id")):
        with pytest.raises(ConfigError) as info:
            add_token(tmp_path / "t", site)
        assert info.value.reason == reason


@pytest.mark.parametrize(
    "text",
    ["site-a", "site-a:xyz", f"site a:{'0' * 64}", f"site-a:{'A' * 64}", f"a:{'0' * 64}\na:{'1' * 64}"],
)
def test_malformed_token_files_are_refused(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_tokens(text, Path("tokens.txt"))
    assert info.value.reason == "bad-token-file"


def test_comments_and_blank_lines_are_allowed() -> None:
    store = parse_tokens(f"# owner sites\n\nsite-a:{hash_token('t')}  # added today\n", Path("t"))
    assert store.identify("t") == "site-a"


def test_certificate_identity_prefers_common_name() -> None:
    assert certificate_identity({"x509_common_name": [b"site-a"], "x509_subject_alternative_name": [b"x"]}) == "site-a"
    assert certificate_identity({"x509_subject_alternative_name": [b"site-b"]}) == "site-b"
    assert certificate_identity({"transport_security_type": [b"ssl"]}) is None


class _Context:
    def __init__(self, metadata: tuple[tuple[str, str], ...], auth: dict[str, list[bytes]] | None = None) -> None:
        self._metadata, self._auth = metadata, auth or {}

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth


def test_identify_by_token_certificate_or_nothing() -> None:
    store = parse_tokens(f"site-a:{hash_token('secret')}", Path("t"))
    tokens_only = AuthInterceptor(store, mtls=False)
    ctx: Any = _Context((("authorization", "Bearer secret"),))
    assert tokens_only.identify(ctx) == "site-a"
    assert tokens_only.identify(_Context((("authorization", "Bearer wrong"),))) is None  # type: ignore[arg-type]
    assert tokens_only.identify(_Context((("authorization", "secret"),))) is None  # type: ignore[arg-type]
    assert tokens_only.identify(_Context(())) is None  # type: ignore[arg-type]
    cert_ctx: Any = _Context((), {"x509_common_name": [b"site-c"]})
    assert AuthInterceptor(None, mtls=True).identify(cert_ctx) == "site-c"
    assert tokens_only.identify(cert_ctx) is None  # certificates count only when mTLS is configured
    assert AuthInterceptor(None, mtls=False, allow_anonymous=True).identify(_Context(())) == ANONYMOUS  # type: ignore[arg-type]


def test_site_is_set_only_while_the_stream_runs() -> None:
    seen: list[str] = []

    def stream() -> Any:
        for i in range(3):
            seen.append(current_site())
            yield i

    assert list(_with_site("site-a", stream)) == [0, 1, 2]
    assert seen == ["site-a"] * 3 and current_site() == ANONYMOUS
