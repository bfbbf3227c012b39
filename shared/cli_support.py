"""What every xkt command shares: error → exit-code translation and option types.

A command body runs inside :func:`cli_errors`.  An :class:`XktError` becomes one line on
stderr (``error: <problem> (fix: <hint>)``) or, with ``--json``, one JSON object on
stdout, and the process exits with the error's :class:`ExitCode`.  Ctrl-C exits 130.
Anything else is a bug: one line plus "rerun with -v", and the traceback only with -v.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from xkt.shared.errors import ExitCode, XktError
from xkt.shared.log import LOGGER_NAME, emit_json, setup_logging, stderr_console

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON result object on stdout.")]
VerboseOption = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv for debug).")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override one config value, e.g. --set optim.lr=0.01 (repeatable).", metavar="KEY=VALUE"
    ),
]


def new_app(name: str, help_text: str) -> typer.Typer:
    """A Typer app with xkt's conventions: -h, help when called bare, no pretty tracebacks.

    Pretty exceptions stay off because they print local variables, which can hold keys.
    """
    return typer.Typer(
        name=name,
        help=help_text,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )


@contextmanager
def command(*, json_output: bool, verbose: int, quiet: bool) -> Iterator[None]:
    """The body of every command: logging from -v/-q, then :func:`cli_errors` around it."""
    setup_logging(-1 if quiet else verbose)
    with cli_errors(json_output=json_output, verbose=verbose):
        yield


@contextmanager
def cli_errors(*, json_output: bool = False, verbose: int = 0) -> Iterator[None]:
    """Turn failures inside a command into one message and a documented exit code."""
    try:
        yield
    except XktError as error:
        _report(error.to_json(), json_output)
        raise typer.Exit(int(error.code)) from None
    except KeyboardInterrupt:
        _report({"code": 130, "name": "interrupted", "message": "interrupted", "hint": ""}, json_output)
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    except typer.Exit:
        raise
    except Exception as error:  # noqa: BLE001 - the one place that turns bugs into exit code 1
        if verbose:
            logging.getLogger(LOGGER_NAME).exception("internal error")
        details = {
            "code": int(ExitCode.UNEXPECTED),
            "name": "unexpected",
            "message": f"internal error: {type(error).__name__}: {error}",
            "hint": "rerun with -v for the traceback and report it",
        }
        _report(details, json_output)
        raise typer.Exit(int(ExitCode.UNEXPECTED)) from None


def _report(error: dict[str, object], json_output: bool) -> None:
    if json_output:
        emit_json({"ok": False, "error": error})
        return
    hint = f" (fix: {error['hint']})" if error.get("hint") else ""
    stderr_console().print(f"error: {error['message']}{hint}", markup=False, highlight=False)
