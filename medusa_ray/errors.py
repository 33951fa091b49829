"""Errors the user can act on: the CLI prints them as one line and exits non-zero, no traceback."""


class UserError(Exception):
    """Bad input, a missing checkpoint, a refused overwrite: something the user can fix."""


def user_error_in(exc: BaseException) -> UserError | None:
    """The ``UserError`` behind an exception Ray raised for a task, actor or dataset (it wraps the original as
    ``cause`` and chains it), or None: a worker's one-line error stays one line on the driver."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None
