"""``xkt-client validate-data``: check a site folder against the data contract."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from xkt.client.data_checks import SiteReport, validate_site
from xkt.shared.cli_support import JsonOption, QuietOption, VerboseOption, command
from xkt.shared.errors import DataError
from xkt.shared.log import emit_json, stderr_console


def validate_data(
    site: Annotated[Path, typer.Argument(help="Site folder (target/, paired/pairs.csv, eval/labels.csv, site.toml).")],
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Check a site's data folder and say what is wrong and how to fix it."""
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        report = validate_site(site)
        if json_output:
            emit_json(report.to_json())
        else:
            _print_report(report)
        if not report.ok:
            errors = sum(f.level == "error" for f in report.findings)
            if json_output:
                raise typer.Exit(int(DataError.code))
            raise DataError(
                f"{site} has {errors} data error(s)", hint="fix the rows marked error above", reason="invalid-site"
            )


def _print_report(report: SiteReport) -> None:
    console = stderr_console()
    counts = ", ".join(f"{k} {v}" for k, v in report.counts.items())
    console.print(f"site {report.site} (modality {report.modality.name}): {counts}")
    if not report.findings:
        console.print("all checks passed")
        return
    table = Table("level", "check", "problem", "fix")
    for finding in report.findings:
        table.add_row(finding.level, finding.check, finding.message, finding.fix)
    console.print(table)
