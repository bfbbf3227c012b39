"""Exit codes: every code documented, errors become one line and the right status."""

from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

from xkt.shared.cli_support import JsonOption, cli_errors
from xkt.shared.errors import (
    EXIT_CODE_HELP,
    AuthError,
    ConfigError,
    DataError,
    ExitCode,
    GuardError,
    PolicyError,
    TransportError,
    VerificationError,
    XktError,
)


def test_every_exit_code_has_help() -> None:
    assert set(EXIT_CODE_HELP) == set(ExitCode)
    assert all(text.strip() for text in EXIT_CODE_HELP.values())


def test_error_classes_carry_their_exit_codes() -> None:
    pairs = {
        ConfigError: 3,
        DataError: 3,
        VerificationError: 4,
        TransportError: 5,
        AuthError: 6,
        PolicyError: 7,
        GuardError: 8,
    }
    for cls, code in pairs.items():
        assert int(cls("x", hint="y").code) == code


def _app(error: Exception) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def run(json_output: JsonOption = False) -> None:
        with cli_errors(json_output=json_output):
            raise error

    return app


def test_user_errors_are_one_line_with_the_fix_and_no_traceback() -> None:
    result = CliRunner().invoke(_app(DataError("target/ is empty", hint="add images")), [])
    assert result.exit_code == 3
    assert result.output.strip() == "error: target/ is empty (fix: add images)"


def test_json_errors_are_one_object_on_stdout() -> None:
    error = VerificationError("bad signature", hint="re-fetch", reason="bad-signature")
    result = CliRunner().invoke(_app(error), ["--json"])
    assert result.exit_code == 4
    payload = json.loads(result.stdout)
    assert payload == {
        "ok": False,
        "error": {
            "code": 4,
            "name": "verification",
            "reason": "bad-signature",
            "message": "bad signature",
            "hint": "re-fetch",
        },
    }


def test_bugs_exit_1_and_interrupts_exit_130() -> None:
    assert CliRunner().invoke(_app(RuntimeError("boom")), []).exit_code == 1
    assert "internal error" in CliRunner().invoke(_app(RuntimeError("boom")), []).output
    assert CliRunner().invoke(_app(KeyboardInterrupt()), []).exit_code == 130
    assert isinstance(XktError("a", hint="b"), Exception)
