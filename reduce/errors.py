"""The one exception users see: a single line naming the file and the field at fault."""

import functools


class ReduceError(Exception):
    """A user-facing error. The CLI prints ``str(error)`` and exits with status 2.

    ``file`` and ``field`` say where the problem is (a condition file and a dotted key,
    a dataset and a variable, a run directory and a stage); ``message`` says what was
    expected. Nothing is half-written when one is raised: every writer is atomic.
    """

    def __init__(self, message: str, *, file=None, field: str | None = None):
        self.file = _printable(str(file)) if file is not None else None
        self.field = _printable(field) if field is not None else None
        self.message = " ".join(str(message).split())  # one line, always
        where = ": ".join(p for p in (self.file, self.field) if p)
        super().__init__(f"{where}: {self.message}" if where else self.message)

    def __reduce__(self):
        # Keep file and field when the error crosses a process boundary (a Dask worker's task):
        # the default would rebuild it from the formatted line alone.
        return functools.partial(ReduceError, file=self.file, field=self.field), (self.message,)


def _printable(name: str) -> str:
    """A name as one printable line: a TOML key may hold a newline or a tab, shown escaped."""
    return name if name.isprintable() else name.encode("unicode_escape").decode("ascii")
