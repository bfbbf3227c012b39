"""The site's own rules for federated work: the ``[policy]`` table of ``site.toml``.

A site owns its data; the owner and the federation server are outsiders it chooses to
work with.  So the site, not the server, decides whose models it adapts, which methods
and which Flower app may run on its machine, how large an update may leave it, how
much DP noise that update must carry, and which metrics may be reported.  The rules
are checked before any site data is read, so a refused request has touched nothing.

Every default denies: a site with no ``[policy]`` table takes part in nothing until its
operator writes one (:func:`policy_template` prints a starting point).  A malformed
policy is a :class:`~xkt.shared.errors.ConfigError` (reason ``bad-policy``); a request
the policy forbids is a :class:`~xkt.shared.errors.PolicyError` whose message names the
rule and whose hint names the ``site.toml`` line that would allow it.  Values that come
from the peer (a fingerprint, a method name, an app hash) are shown quoted and are only
offered as a line to paste when they are well-formed.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from xkt.shared.config import from_mapping
from xkt.shared.errors import ConfigError, PolicyError
from xkt.shared.files import FileReasons, read_bounded_file
from xkt.shared.signing import is_fingerprint

MAX_SITE_TOML_BYTES = 1024 * 1024
"""site.toml holds two short tables; anything far larger is not a site.toml."""

_SITE_TOML_REASONS = FileReasons("site-toml-missing", "bad-policy", "bad-policy", "bad-policy")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_WHERE = "under [policy] in site.toml"


@dataclass(frozen=True)
class SitePolicy:
    """What a site allows.  The defaults refuse every federated action (deny by default)."""

    allowed_owner_keys: tuple[str, ...] = ()
    """Owner key fingerprints (``"ed25519:<64 hex>"``) whose models the site adapts; empty refuses every owner."""

    allowed_methods: tuple[str, ...] = ()
    """Adaptation methods the site runs (``"shot"``, ``"socket"`` ...); empty refuses every method."""

    app_sha256: tuple[str, ...] = ()
    """SHA-256 (64 lowercase hex) of the Flower app bundles (FAB) the site runs; empty refuses federated runs."""

    max_upload_bytes: int = 0
    """Largest model update the site uploads per round; 0 uploads no model update (metrics only)."""

    metrics: tuple[str, ...] = ("num_examples",)
    """Metric names allowed to leave the site; any other metric is dropped before sending."""

    min_dp_noise_multiplier: float = 0.0
    """The site refuses to upload an update whose DP noise multiplier is below this (0.0: no DP required)."""

    require_secure_aggregation: bool = False
    """The site uploads its update only masked by SecAgg+, so the owner sees nothing but the sites' sum."""

    def __post_init__(self) -> None:
        _check_values(self)


# ------------------------------------------------------------------ loading


def load_policy(site: Path) -> SitePolicy:
    """The ``[policy]`` of ``site/site.toml``; the deny-all default when the file or the table is absent."""
    path = Path(site) / "site.toml"
    try:
        data = read_bounded_file(
            path,
            what="site.toml",
            limit=MAX_SITE_TOML_BYTES,
            private=False,
            reasons=_SITE_TOML_REASONS,
            missing_hint="",
        )
    except ConfigError as error:
        if error.reason == _SITE_TOML_REASONS.not_found:
            return SitePolicy()
        raise
    try:
        table = tomllib.loads(data.decode("utf-8")).get("policy")
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise _bad_policy(f"{path} is not valid UTF-8 TOML ({error})", "fix the TOML syntax of site.toml") from None
    if table is None:
        return SitePolicy()
    if not isinstance(table, dict):
        raise _bad_policy(f"{path}: policy must be a table", "write [policy] on its own line, then key = value lines")
    try:
        return from_mapping(SitePolicy, table, where="policy.")
    except ConfigError as error:
        raise _bad_policy(f"{path}: {error.message}", error.hint) from None


def _check_values(policy: SitePolicy) -> None:
    """Refuse values of the right type but the wrong form, naming the key and the fix."""
    for index, key in enumerate(policy.allowed_owner_keys):
        if not is_fingerprint(key):
            raise _bad_policy(
                f"policy.allowed_owner_keys[{index}] = {_shown(key)} is not an owner key fingerprint",
                'write "ed25519:" plus 64 lowercase hex digits, as `xkt-server keys init` prints it',
            )
    for field, values in (("allowed_methods", policy.allowed_methods), ("metrics", policy.metrics)):
        for index, name in enumerate(values):
            if not _NAME.fullmatch(name):
                raise _bad_policy(
                    f"policy.{field}[{index}] = {_shown(name)} is not a name",
                    "use letters, digits, '.', '_' and '-' only (at most 64), as in \"shot\"",
                )
    for index, digest in enumerate(policy.app_sha256):
        if not _SHA256.fullmatch(digest):
            raise _bad_policy(
                f"policy.app_sha256[{index}] = {_shown(digest)} is not a SHA-256 hex digest",
                "write the 64 lowercase hex digits that `sha256sum app.fab` prints",
            )
    if policy.max_upload_bytes < 0:
        raise _bad_policy("policy.max_upload_bytes is negative", "write 0 (no model upload) or a byte count")
    if not (math.isfinite(policy.min_dp_noise_multiplier) and policy.min_dp_noise_multiplier >= 0):
        raise _bad_policy(
            "policy.min_dp_noise_multiplier must be a finite number >= 0",
            "write 0.0 (no DP required) or the smallest noise multiplier the site accepts, e.g. 1.0",
        )


# ------------------------------------------------------------------ the rules


def check_owner(policy: SitePolicy, fingerprint: str) -> None:
    """Refuse a model signed by an owner key the site has not listed (reason ``owner-not-allowed``)."""
    if fingerprint in policy.allowed_owner_keys:
        return
    line = _line("allowed_owner_keys", (*policy.allowed_owner_keys, fingerprint)) if is_fingerprint(fingerprint) else ""
    raise PolicyError(
        f"site policy rule allowed_owner_keys: the owner key {_shown(fingerprint)} is not allowed"
        + _empty(policy.allowed_owner_keys),
        hint=f"if you trust this owner, add {_WHERE}: {line}" if line else "this is not a well-formed owner key",
        reason="owner-not-allowed",
    )


def check_method(policy: SitePolicy, method: str) -> None:
    """Refuse an adaptation method the site has not listed (reason ``method-not-allowed``)."""
    if method in policy.allowed_methods:
        return
    line = _line("allowed_methods", (*policy.allowed_methods, method)) if _NAME.fullmatch(method) else ""
    raise PolicyError(
        f"site policy rule allowed_methods: the method {_shown(method)} is not allowed{_empty(policy.allowed_methods)}",
        hint=f"to run it here, add {_WHERE}: {line}" if line else "this is not a well-formed method name",
        reason="method-not-allowed",
    )


def check_app(policy: SitePolicy, fab_sha256: str) -> None:
    """Refuse a Flower app bundle whose SHA-256 the site has not pinned (reason ``app-not-pinned``)."""
    if fab_sha256 in policy.app_sha256:
        return
    line = _line("app_sha256", (*policy.app_sha256, fab_sha256)) if _SHA256.fullmatch(fab_sha256) else ""
    refused = " (no app is pinned, so every federated run is refused)" if not policy.app_sha256 else ""
    raise PolicyError(
        f"site policy rule app_sha256: the Flower app {_shown(fab_sha256)} is not pinned{refused}",
        hint=f"after reviewing that app bundle, add {_WHERE}: {line}" if line else "this is not a SHA-256 hex digest",
        reason="app-not-pinned",
    )


def check_upload(policy: SitePolicy, nbytes: int, noise_multiplier: float) -> None:
    """Refuse an upload over ``max_upload_bytes`` (``upload-too-large``) or with too little noise (``dp-too-weak``)."""
    if not 0 <= nbytes <= policy.max_upload_bytes:
        never = " (0: the site uploads no model update)" if policy.max_upload_bytes == 0 else ""
        raise PolicyError(
            f"site policy rule max_upload_bytes: an update of {nbytes} bytes exceeds {policy.max_upload_bytes}{never}",
            hint=f"to allow it, set {_WHERE}: max_upload_bytes = {max(nbytes, 0)}",
            reason="upload-too-large",
        )
    if not noise_multiplier >= policy.min_dp_noise_multiplier:  # written so that nan is refused too
        weaken = f", or (weakening the site's privacy) set {_WHERE}: min_dp_noise_multiplier = {noise_multiplier!r}"
        raise PolicyError(
            f"site policy rule min_dp_noise_multiplier: noise multiplier {noise_multiplier} is below "
            f"{policy.min_dp_noise_multiplier}",
            hint=f"run with a DP noise multiplier >= {policy.min_dp_noise_multiplier}"
            + (weaken if math.isfinite(noise_multiplier) and noise_multiplier >= 0 else ""),
            reason="dp-too-weak",
        )


def check_secure_aggregation(policy: SitePolicy, enabled: bool) -> None:
    """Refuse a plain-text update when the site requires SecAgg+ (reason ``secagg-required``)."""
    if enabled or not policy.require_secure_aggregation:
        return
    raise PolicyError(
        "site policy rule require_secure_aggregation: this run would upload the site's update unmasked",
        hint="ask the owner to run with --secure-aggregation, or (weakening the site's privacy) set "
        f"{_WHERE}: require_secure_aggregation = false",
        reason="secagg-required",
    )


def filter_metrics(policy: SitePolicy, metrics: Mapping[str, float]) -> dict[str, float]:
    """Only the metrics the site lets leave, in their original order; the rest are dropped, not refused."""
    return {name: value for name, value in metrics.items() if name in policy.metrics}


def check_request(policy: SitePolicy, *, owner_fingerprint: str, method: str, fab_sha256: str) -> None:
    """The three identity rules of a federated request, in order: owner, method, app."""
    check_owner(policy, owner_fingerprint)
    check_method(policy, method)
    check_app(policy, fab_sha256)


# ------------------------------------------------------------------ the template


def policy_template(owner_fingerprint: str, methods: Sequence[str], app_sha256: str) -> str:
    """A commented ``[policy]`` table allowing exactly this owner, these methods and this app, to paste into site.toml.

    Uploads stay off (``max_upload_bytes = 0``) until the operator sets a size: the
    template never opens more than it names.
    """
    names = (methods,) if isinstance(methods, str) else tuple(methods)  # one bare name is one method, not its letters
    policy = SitePolicy(allowed_owner_keys=(owner_fingerprint,), allowed_methods=names, app_sha256=(app_sha256,))
    return "\n".join(
        [
            "# What this site allows; anything not listed here is refused.",
            "[policy]",
            "# Owner keys whose models this site adapts (the owner's `xkt-server keys init` prints its fingerprint).",
            _line("allowed_owner_keys", policy.allowed_owner_keys),
            "# Adaptation methods this site runs.",
            _line("allowed_methods", policy.allowed_methods),
            "# SHA-256 of the Flower app bundles (.fab) this site runs; check with `sha256sum app.fab`.",
            _line("app_sha256", policy.app_sha256),
            "# Largest model update uploaded per round, in bytes; 0 uploads no update (metrics only).",
            f"max_upload_bytes = {policy.max_upload_bytes}",
            "# Metric names allowed to leave the site; all others are dropped.",
            _line("metrics", policy.metrics),
            "# Smallest DP noise multiplier an upload must carry; 0.0 requires no DP.",
            f"min_dp_noise_multiplier = {policy.min_dp_noise_multiplier!r}",
            "# true: upload only through secure aggregation (SecAgg+), never an update the owner can read alone.",
            f"require_secure_aggregation = {str(policy.require_secure_aggregation).lower()}",
            "",
        ]
    )


# ------------------------------------------------------------------ helpers


def _line(key: str, values: Sequence[str]) -> str:
    """``key = ["a", "b"]``: a JSON string array is also a valid TOML array."""
    return f"{key} = {json.dumps(list(values))}"


def _shown(value: object) -> str:
    """A peer-supplied value for a message: quoted (so control characters are escaped) and bounded."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _empty(values: Sequence[str]) -> str:
    return " (the list is empty, so every one is refused)" if not values else ""


def _bad_policy(message: str, hint: str) -> ConfigError:
    return ConfigError(message, hint=hint, reason="bad-policy")
