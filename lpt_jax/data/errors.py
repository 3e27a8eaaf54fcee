"""The one exception type the data package raises for user-fixable problems."""


class DataError(ValueError):
    """A data problem the user can fix: the message names the file, value or field."""
