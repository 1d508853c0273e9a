"""The one error type for bad configuration: its message names the key, the value and what would work."""


class ConfigError(ValueError):
    pass
