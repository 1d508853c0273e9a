"""The one exception type for bad data input, so callers can catch it apart from programming errors."""


class DataError(ValueError):
    """Bad data input or data configuration. The message names the file or setting and the fix."""
