"""Errors a user can act on, and the process exit codes they map to.

Every failure that a person can fix (a wrong path, a tampered artifact, a bad config
value) is raised as an :class:`XktError` subclass carrying a one-line message that
names the problem and a hint that names the fix.  The command-line layer turns these
into a single line on stderr (or a JSON object with ``--json``) and the matching
:class:`ExitCode`; anything else is a bug and exits with ``ExitCode.UNEXPECTED``.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit status of every xkt command. The value *is* the status."""

    OK = 0
    UNEXPECTED = 1
    USAGE = 2
    CONFIG_OR_DATA = 3
    VERIFICATION = 4
    TRANSPORT = 5
    AUTH = 6
    POLICY = 7
    GUARD = 8
    INTERRUPTED = 130


EXIT_CODE_HELP: dict[ExitCode, str] = {
    ExitCode.OK: "Success.",
    ExitCode.UNEXPECTED: "An internal error (a bug): rerun with -v and report the traceback.",
    ExitCode.USAGE: "Wrong command-line usage: see the command's --help.",
    ExitCode.CONFIG_OR_DATA: "A config file, option value or data folder is invalid: fix what the message names.",
    ExitCode.VERIFICATION: "A model artifact failed signature, digest or format checks: do not use it; re-fetch or re-export it.",
    ExitCode.TRANSPORT: "The server is unreachable or the TLS setup is wrong: check the address, certificates and --insecure.",
    ExitCode.AUTH: "The peer refused our identity (certificate or token): check the site kit or token file.",
    ExitCode.POLICY: "The site policy (site.toml) forbids this action: change the policy or the request.",
    ExitCode.GUARD: "The negative-transfer guard refused the adapted model: label-free signals say it is worse than the source.",
    ExitCode.INTERRUPTED: "Interrupted by the user (Ctrl-C); partial outputs were not published.",
}


class XktError(Exception):
    """A failure the user can fix: a one-line message plus a hint naming the fix.

    ``reason`` is a short stable slug (for example ``"bad-signature"``) so tests and
    machine consumers can tell failures apart without matching message text.
    """

    code: ExitCode = ExitCode.UNEXPECTED

    def __init__(self, message: str, *, hint: str, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.reason = reason

    def to_json(self) -> dict[str, object]:
        """The error as the ``error`` member of a ``--json`` result."""
        return {
            "code": int(self.code),
            "name": self.code.name.lower(),
            "reason": self.reason,
            "message": self.message,
            "hint": self.hint,
        }


class ConfigError(XktError):
    """A config file, preset or ``--set`` override is invalid."""

    code = ExitCode.CONFIG_OR_DATA


class DataError(XktError):
    """A data folder breaks the data contract (DESIGN.md, 'Data contract')."""

    code = ExitCode.CONFIG_OR_DATA


class VerificationError(XktError):
    """A model artifact failed its signature, digest or format checks."""

    code = ExitCode.VERIFICATION


class TransportError(XktError):
    """A server could not be reached or the TLS handshake failed."""

    code = ExitCode.TRANSPORT


class AuthError(XktError):
    """The peer refused our identity, or we refused theirs."""

    code = ExitCode.AUTH


class PolicyError(XktError):
    """The site policy forbids the requested action."""

    code = ExitCode.POLICY


class GuardError(XktError):
    """The negative-transfer guard refused to publish an adapted model."""

    code = ExitCode.GUARD
