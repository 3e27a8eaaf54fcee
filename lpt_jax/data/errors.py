"""The one exception type the data package raises for user-fixable problems."""

import re

# Lines of a TF error message around the cause: the graph-mode header and the Python trace.
_TF_BOILERPLATE = re.compile(r"^(Graph execution error:|Detected at node|File \"|\[\[)")


class DataError(ValueError):
    """A data problem the user can fix: the message names the file, value or field."""


def first_line(err: Exception) -> str:
    """The line of an exception's message that says what went wrong (for TF errors, the
    cause, e.g. 'Invalid JPEG data, size 200', without node names and trace)."""
    msg = getattr(err, "message", None) or str(err)
    for line in msg.splitlines():
        line = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]", "", line).strip()
        if line and not _TF_BOILERPLATE.match(line):
            return line.rstrip(".")  # callers append '; what to do'
    return type(err).__name__
