"""The site's [policy] table: safe defaults, loading errors, each rule and the paste-in template."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from xkt.shared.errors import ConfigError, ExitCode, PolicyError
from xkt.shared.site_policy import (
    SitePolicy,
    check_app,
    check_method,
    check_owner,
    check_request,
    check_secure_aggregation,
    check_upload,
    filter_metrics,
    load_policy,
    policy_template,
)

OWNER = "ed25519:" + "ab" * 32
OTHER_OWNER = "ed25519:" + "cd" * 32
APP = "0123456789abcdef" * 4
OTHER_APP = "f" * 64
MODALITY = '[modality]\nname = "depth"\nchannels = 1\nunits = "mm"\nvalue_range = [0, 10000]\n'


def site_with(tmp_path: Path, policy: str) -> Path:
    (tmp_path / "site.toml").write_text(MODALITY + policy, encoding="utf-8")
    return tmp_path


def allowing(**changes: object) -> SitePolicy:
    values: dict[str, object] = {"allowed_owner_keys": (OWNER,), "allowed_methods": ("shot",), "app_sha256": (APP,)}
    return SitePolicy(**{**values, **changes})  # type: ignore[arg-type]


def reason_of(error: pytest.ExceptionInfo[PolicyError]) -> str:
    assert error.value.code is ExitCode.POLICY
    return error.value.reason


# ------------------------------------------------------------------ defaults and loading


def test_the_default_policy_denies_everything() -> None:
    policy = SitePolicy()
    for check, value, reason in [
        (check_owner, OWNER, "owner-not-allowed"),
        (check_method, "shot", "method-not-allowed"),
        (check_app, APP, "app-not-pinned"),
    ]:
        with pytest.raises(PolicyError) as error:
            check(policy, value)
        assert reason_of(error) == reason
    with pytest.raises(PolicyError) as error:
        check_upload(policy, 1, noise_multiplier=10.0)
    assert reason_of(error) == "upload-too-large" and "no model update" in error.value.message
    assert filter_metrics(policy, {"num_examples": 5.0, "accuracy": 0.9}) == {"num_examples": 5.0}


def test_missing_file_or_table_is_the_default(tmp_path: Path) -> None:
    assert load_policy(tmp_path) == SitePolicy()
    assert load_policy(site_with(tmp_path, "")) == SitePolicy()


def test_a_policy_table_is_read(tmp_path: Path) -> None:
    site = site_with(
        tmp_path,
        f'[policy]\nallowed_owner_keys = ["{OWNER}"]\nallowed_methods = ["shot", "socket"]\n'
        f'app_sha256 = ["{APP}"]\nmax_upload_bytes = 1000\nmetrics = []\nmin_dp_noise_multiplier = 1\n',
    )
    assert load_policy(site) == SitePolicy((OWNER,), ("shot", "socket"), (APP,), 1000, (), 1.0)


def test_unknown_key_suggests_the_nearest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_policy(site_with(tmp_path, '[policy]\nallowed_method = ["shot"]\n'))
    assert error.value.reason == "bad-policy"
    assert "allowed_method" in error.value.message and "policy.allowed_methods" in error.value.hint


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('allowed_owner_keys = "ed25519:ab"', "allowed_owner_keys"),
        ('allowed_owner_keys = ["ed25519:AB"]', "allowed_owner_keys[0]"),
        (f'allowed_owner_keys = ["{OWNER}", "{OWNER[:-1]}"]', "allowed_owner_keys[1]"),
        ('allowed_methods = ["shot", "rm -rf"]', "allowed_methods[1]"),
        ('app_sha256 = ["abc"]', "app_sha256[0]"),
        (f'app_sha256 = ["{APP.upper()}"]', "app_sha256[0]"),
        ('max_upload_bytes = "10"', "max_upload_bytes"),
        ("max_upload_bytes = -1", "max_upload_bytes"),
        ("max_upload_bytes = 1.5", "max_upload_bytes"),
        ("min_dp_noise_multiplier = -0.5", "min_dp_noise_multiplier"),
        ("min_dp_noise_multiplier = nan", "min_dp_noise_multiplier"),
        ("metrics = [1]", "metrics[0]"),
    ],
)
def test_malformed_values_name_the_key(tmp_path: Path, body: str, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_policy(site_with(tmp_path, f"[policy]\n{body}\n"))
    assert error.value.reason == "bad-policy"
    assert f"policy.{key}" in error.value.message and error.value.hint


def test_policy_that_is_not_a_table_or_bad_toml(tmp_path: Path) -> None:
    for text in ("policy = 3\n", "[policy\n"):
        (tmp_path / "site.toml").write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as error:
            load_policy(tmp_path)
        assert error.value.reason == "bad-policy"


# ------------------------------------------------------------------ the rules


def test_identity_checks_pass_for_what_is_listed() -> None:
    policy = allowing(allowed_methods=("shot", "socket"))
    check_request(policy, owner_fingerprint=OWNER, method="socket", fab_sha256=APP)


def test_owner_refusal_names_the_rule_and_the_line() -> None:
    with pytest.raises(PolicyError) as error:
        check_owner(allowing(), OTHER_OWNER)
    assert reason_of(error) == "owner-not-allowed"
    assert "allowed_owner_keys" in error.value.message and OTHER_OWNER in error.value.message
    assert f'allowed_owner_keys = ["{OWNER}", "{OTHER_OWNER}"]' in error.value.hint


def test_a_malformed_peer_value_is_escaped_and_not_offered_as_a_line() -> None:
    with pytest.raises(PolicyError) as error:
        check_owner(allowing(), "ed25519:\x1b[31mevil")
    assert "\x1b" not in error.value.message and "\\x1b" in error.value.message
    assert "allowed_owner_keys =" not in error.value.hint


def test_method_refusal() -> None:
    with pytest.raises(PolicyError) as error:
        check_method(allowing(), "cmcd")
    assert reason_of(error) == "method-not-allowed"
    assert "allowed_methods" in error.value.message
    assert 'allowed_methods = ["shot", "cmcd"]' in error.value.hint


def test_app_refusal() -> None:
    with pytest.raises(PolicyError) as error:
        check_app(allowing(), OTHER_APP)
    assert reason_of(error) == "app-not-pinned"
    assert f'app_sha256 = ["{APP}", "{OTHER_APP}"]' in error.value.hint


def test_request_checks_owner_then_method_then_app() -> None:
    with pytest.raises(PolicyError) as error:
        check_request(SitePolicy(), owner_fingerprint=OTHER_OWNER, method="cmcd", fab_sha256=OTHER_APP)
    assert reason_of(error) == "owner-not-allowed"
    with pytest.raises(PolicyError) as error:
        check_request(allowing(), owner_fingerprint=OWNER, method="cmcd", fab_sha256=OTHER_APP)
    assert reason_of(error) == "method-not-allowed"
    with pytest.raises(PolicyError) as error:
        check_request(allowing(), owner_fingerprint=OWNER, method="shot", fab_sha256=OTHER_APP)
    assert reason_of(error) == "app-not-pinned"


def test_upload_size_limit_is_inclusive() -> None:
    policy = allowing(max_upload_bytes=100)
    check_upload(policy, 100, noise_multiplier=0.0)
    with pytest.raises(PolicyError) as error:
        check_upload(policy, 101, noise_multiplier=0.0)
    assert reason_of(error) == "upload-too-large"
    assert "max_upload_bytes = 101" in error.value.hint


def test_dp_noise_floor() -> None:
    policy = allowing(max_upload_bytes=100, min_dp_noise_multiplier=1.0)
    check_upload(policy, 10, noise_multiplier=1.0)
    with pytest.raises(PolicyError) as error:
        check_upload(policy, 10, noise_multiplier=0.99)
    assert reason_of(error) == "dp-too-weak" and "min_dp_noise_multiplier" in error.value.message
    assert "noise multiplier >= 1.0" in error.value.hint and "min_dp_noise_multiplier = 0.99" in error.value.hint
    with pytest.raises(PolicyError) as error:
        check_upload(policy, 10, noise_multiplier=float("nan"))  # nan compares false both ways: still refused
    assert reason_of(error) == "dp-too-weak" and "min_dp_noise_multiplier =" not in error.value.hint


def test_metrics_outside_the_list_are_dropped_in_order() -> None:
    policy = allowing(metrics=("loss", "num_examples"))
    kept = filter_metrics(policy, {"num_examples": 8.0, "entropy": 0.3, "loss": 1.5})
    assert list(kept.items()) == [("num_examples", 8.0), ("loss", 1.5)]


# ------------------------------------------------------------------ the template


def test_template_parses_back_to_exactly_what_it_names(tmp_path: Path) -> None:
    text = policy_template(OWNER, ["shot", "socket"], APP)
    assert all(line.startswith("#") or "=" in line or line == "[policy]" for line in text.splitlines() if line)
    tomllib.loads(text)
    policy = load_policy(site_with(tmp_path, "\n" + text))
    assert policy == SitePolicy(allowed_owner_keys=(OWNER,), allowed_methods=("shot", "socket"), app_sha256=(APP,))
    check_request(policy, owner_fingerprint=OWNER, method="socket", fab_sha256=APP)
    for kwargs in (
        {"owner_fingerprint": OTHER_OWNER, "method": "shot", "fab_sha256": APP},
        {"owner_fingerprint": OWNER, "method": "cmcd", "fab_sha256": APP},
        {"owner_fingerprint": OWNER, "method": "shot", "fab_sha256": OTHER_APP},
    ):
        with pytest.raises(PolicyError):
            check_request(policy, **kwargs)
    with pytest.raises(PolicyError):
        check_upload(policy, 1, noise_multiplier=1.0)  # uploads stay off until the operator sizes them


def test_template_takes_one_bare_method_name() -> None:
    assert 'allowed_methods = ["shot"]' in policy_template(OWNER, "shot", APP)


def test_template_refuses_malformed_values() -> None:
    with pytest.raises(ConfigError) as error:
        policy_template("ed25519:nothex", ["shot"], APP)
    assert error.value.reason == "bad-policy"


def test_a_site_that_requires_secure_aggregation_refuses_a_plain_upload() -> None:
    strict = SitePolicy(require_secure_aggregation=True)
    check_secure_aggregation(strict, True)
    check_secure_aggregation(SitePolicy(), False)  # the default does not require it
    with pytest.raises(PolicyError) as caught:
        check_secure_aggregation(strict, False)
    assert caught.value.reason == "secagg-required"
    assert "--secure-aggregation" in caught.value.hint
