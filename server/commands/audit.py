"""``xkt-server audit``: check the serving audit log's hash chain."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xkt.server.audit_log import verify_log
from xkt.shared.cli_support import JsonOption, QuietOption, VerboseOption, command
from xkt.shared.errors import ConfigError, VerificationError
from xkt.shared.log import emit_json, stderr_console

app = typer.Typer(help="Inspect the serving audit log.", no_args_is_help=True)


@app.command("verify")
def verify(
    log: Annotated[Path, typer.Argument(help="Audit log written by `xkt-server serve --audit-log`.")],
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Check every entry's hash and link; exit 4 at the first edited, deleted or reordered line."""
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        if not log.is_file():
            raise ConfigError(f"audit log {log} does not exist", hint="pass the --audit-log file", reason="no-log")
        check = verify_log(log)
        if not check.ok:
            raise VerificationError(
                f"audit log {log} is broken at line {check.first_bad_line}: {check.reason}",
                hint="the log was altered after it was written; keep it as evidence and investigate",
                reason="audit-chain-broken",
            )
        if json_output:
            emit_json({"ok": True, "log": str(log), "entries": check.entries, "head": check.head})
        else:
            stderr_console().print(f"{log}: {check.entries} entries, chain intact; head {check.head}")
