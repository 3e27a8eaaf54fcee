"""TensorFlow's error messages as one line (what the data package's `DataError`s quote)."""

import re

# Lines of a TF error message around the cause: the graph-mode header and the Python trace.
_TF_BOILERPLATE = re.compile(r"^(Graph execution error:|Detected at node|File \"|\[\[)")


def first_line(err: Exception) -> str:
    """The line of an exception's message that says what went wrong (for TF errors, the
    cause, e.g. 'Invalid JPEG data, size 200', without node names and trace)."""
    msg = getattr(err, "message", None) or str(err)
    for line in msg.splitlines():
        line = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]", "", line).strip()
        if line and not _TF_BOILERPLATE.match(line):
            return line.rstrip(".")  # callers append '; what to do'
    return type(err).__name__
