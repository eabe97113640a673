"""What the command line prints when a command fails: one line that says what to do, not a
traceback. `turngate --debug ...` (or TURNGATE_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

import typer
from pydantic import ValidationError

DB_WHERE = "--url or TURNGATE_DATABASE_URL"


def one_line(text: object) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


class CommandFailed(Exception):
    """A failure the command has put in words already (with its fix)."""


class DatabaseProblem(Exception):
    """A database failure put in words; `waitable` when the server did not answer at all (it may
    be down for a while), as opposed to answering with a refusal that waiting will not change."""

    def __init__(self, message: str, *, waitable: bool) -> None:
        super().__init__(message)
        self.waitable = waitable


def database_problem(exc: BaseException) -> DatabaseProblem | None:
    """The SQLAlchemy / driver error `exc` in words with the fix, or None if it is not one."""
    from sqlalchemy import exc as sa

    if isinstance(exc, sa.ArgumentError | sa.NoSuchModuleError):
        return DatabaseProblem(f"cannot use the database URL ({DB_WHERE}): {one_line(exc)}; "
                               "use postgresql://user:password@host:5432/name or sqlite:///path", waitable=False)
    if not isinstance(exc, sa.DBAPIError):
        return None
    detail = one_line(exc.orig if exc.orig is not None else exc)
    low = detail.lower()
    if "database" in low and "does not exist" in low:
        name = re.search(r'database "([^"]+)" does not exist', detail)
        return DatabaseProblem(f"{detail}: create it (createdb {name.group(1) if name else 'NAME'}) and run "
                               "`turngate db upgrade`, or fix the name in " + DB_WHERE, waitable=False)
    if "password authentication failed" in low or ("role" in low and "does not exist" in low) \
            or "no password supplied" in low:
        return DatabaseProblem(f"the database refused the login: {detail}; fix the user and password in "
                               + DB_WHERE, waitable=False)
    if ("relation" in low and "does not exist" in low) or "no such table" in low:
        return DatabaseProblem(f"the database has no turngate tables ({detail}): run `turngate db upgrade` "
                               "with the same URL", waitable=False)
    if "unable to open database file" in low:
        return DatabaseProblem(f"cannot open the SQLite database file ({detail}): its folder must exist and be "
                               "writable; fix the path in " + DB_WHERE, waitable=False)
    if isinstance(exc, sa.OperationalError) and "fatal" not in low:
        return DatabaseProblem(f"cannot reach the database: {detail}; start it, or fix the host and port in "
                               + DB_WHERE, waitable=True)
    return DatabaseProblem(f"database error: {detail}", waitable=False)


def explain(exc: BaseException) -> str:
    """One line for any failure of a command, with the fix where the failure is a known kind."""
    from service.cli_routes import AdminAPIProblem
    from service.critic.bundle import BundleError
    from service.settings import Settings, SettingsError, describe_invalid

    if isinstance(exc, SettingsError | DatabaseProblem | CommandFailed | AdminAPIProblem):
        return one_line(exc)
    if isinstance(exc, ValidationError) and exc.title == Settings.__name__:
        return one_line(describe_invalid(exc))
    if isinstance(exc, ValidationError):
        return one_line(f"invalid settings: {exc.error_count()} error(s) in {exc.title}: "
                        + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    if isinstance(exc, BundleError):
        return one_line(f"{exc}: point TURNGATE_CRITIC (or the command's --bundle / --critic) at a critic bundle "
                        "folder (model.onnx, tokenizer.json, critic.json), or unset it for the shipped one")
    if (db := database_problem(exc)) is not None:
        return one_line(db)
    if isinstance(exc, OSError) and exc.filename is not None:
        return one_line(f"{exc.strerror or exc}: {exc.filename}")
    return one_line(f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)")


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("TURNGATE_DEBUG", "").lower() in ("1", "true", "yes", "on")


def run(app: Callable[[], object]) -> None:
    """Runs the CLI; a failure becomes `turngate: error: ...` on stderr and exit status 1."""
    try:
        app()
    except Exception as exc:  # every failure gets its one line; --debug re-raises
        if debug_requested(sys.argv[1:]):
            raise
        typer.echo(f"turngate: error: {explain(exc)}", err=True)
        raise SystemExit(1) from None
