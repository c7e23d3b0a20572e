"""Typed errors and the one table that maps them to exit codes.

Every command of fwsafe exits with one of these codes, and only here are they defined:

    0  OK           applied and confirmed (or armed, with --detach); a query succeeded
    1  LOCKOUT      `fwsafe check` predicts a lockout (nothing was changed); `fwsafe audit`:
                  something unexpected is reachable from the world (the same kind of answer:
                  a read-only check found the problem it looks for)
    2  USAGE        bad command line or configuration
    3  REJECTED     rejected before any change: invalid input, nothing changed
    4  REVERTED     applied and then reverted (timeout, declined, probe failure)
    5  REVERT_FAILED the revert failed, or the change may be live with its outcome unknown:
                  the firewall may be in the new state; act now
    6  PENDING      another transaction is pending
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    LOCKOUT = 1
    USAGE = 2
    REJECTED = 3
    REVERTED = 4
    REVERT_FAILED = 5
    PENDING = 6


EXIT_CODE_HELP: dict[ExitCode, str] = {
    ExitCode.OK: "applied and confirmed (or armed, with --detach); query succeeded",
    ExitCode.LOCKOUT: "check: a lockout is predicted; audit: something unexpected is exposed "
                      "(nothing changed)",
    ExitCode.USAGE: "usage or configuration error",
    ExitCode.REJECTED: "rejected before any change (invalid input; nothing changed)",
    ExitCode.REVERTED: "applied and then reverted (timeout, declined, probe failure)",
    ExitCode.REVERT_FAILED: "revert FAILED: the firewall may still hold the new rules",
    ExitCode.PENDING: "another transaction is pending",
}


class FwsafeError(Exception):
    """Base class: every error fwsafe reports to a user. `exit_code` decides the exit status."""

    exit_code: ExitCode = ExitCode.REJECTED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(FwsafeError):
    exit_code = ExitCode.USAGE


class ConfigError(UsageError):
    """The configuration file is unreadable, has an unknown key or a wrong type."""


class RejectedError(FwsafeError):
    """Refused before anything changed."""

    exit_code = ExitCode.REJECTED


class InvalidRulesError(RejectedError):
    """A rules file that the backend refuses (names the file and the line where known)."""

    def __init__(
        self, message: str, *, path: str | None = None, line: int | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.path = path
        self.line = line


class CannotSimulateError(RejectedError):
    """`check`/`diff` of a command that cannot be tried on a copy (in the sandbox it reached a
    live daemon's socket, e.g. firewall-cmd and the system D-Bus): it was not run live."""

    def __init__(self, message: str, *, reached: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reached = reached   # the daemons' sockets it reached, described


class LockoutRefused(RejectedError):
    """`apply` refused a change that the check predicts would lock the SSH clients out."""


class EnvironmentProblem(RejectedError):
    """Not root, a missing binary, an unusable state directory: nothing was changed."""


class StateError(RejectedError):
    """The state directory is damaged or not usable."""


class RecordFormatError(StateError):
    """A transaction record written by a newer fwsafe (a newer major `format`)."""


class UnsafeStateDirError(UsageError):
    """The state directory, or one of its parents, could be changed by someone other than
    root (writable by group/others, another owner, a symlink): refused before it is used."""


class NoTransactionError(RejectedError):
    """confirm/revert/extend/recover with nothing to act on: nothing was changed."""


class PendingError(FwsafeError):
    exit_code = ExitCode.PENDING


class LockoutPredicted(FwsafeError):
    exit_code = ExitCode.LOCKOUT


class RevertedError(FwsafeError):
    """The change was applied and then reverted."""

    exit_code = ExitCode.REVERTED


class RevertFailedError(FwsafeError):
    exit_code = ExitCode.REVERT_FAILED


class GuardError(FwsafeError):
    """The guard could not be started or reached; nothing was changed when raised before apply."""

    exit_code = ExitCode.REJECTED


class ChangeMayBeLiveError(FwsafeError):
    """The guard was started and it is not known whether the change is live (the guard died
    while applying, or is still applying): never "nothing changed"."""

    exit_code = ExitCode.REVERT_FAILED


class InternalError(FwsafeError):
    """An unexpected exception (a bug), reported by `cli.main` in one line; the exit code is 5
    when a change may be live, else 3, and the traceback is kept in a file."""

    def __init__(self, message: str, *, exit_code: ExitCode, traceback_file: str | None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.traceback_file = traceback_file
