"""Typed access to a driver's options, whether they came from JSON or from keyval strings.

QMP gives typed JSON values; command lines give strings. A driver takes each option it knows
with the right accessor, then calls ``finish`` so that a misspelt option is an error rather
than silently ignored.
"""

from __future__ import annotations

from typing import Any

from pyfleece.errors import ConfigError
from pyfleece.keyval import parse_size

_TRUE = {"on", "true", "yes", "1"}
_FALSE = {"off", "false", "no", "0"}


class _Missing:
    pass


MISSING: Any = _Missing()


class Options:
    """One level of driver options, consumed key by key."""

    def __init__(self, values: dict[str, Any], where: str) -> None:
        self._values = dict(values)
        self.where = where

    def has(self, key: str) -> bool:
        return key in self._values

    def raw(self, key: str, default: Any = MISSING) -> Any:
        """Takes a value as given (a str, dict, list, None, ...)."""
        if key in self._values:
            return self._values.pop(key)
        if default is MISSING:
            raise ConfigError(f"Parameter '{key}' is missing")
        return default

    def get_str(self, key: str, default: Any = MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not MISSING:
            return value
        if not isinstance(value, str):
            raise ConfigError(f"Invalid parameter type for '{key}', expected: string")
        return value

    def get_int(self, key: str, default: Any = MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not MISSING:
            return value
        if isinstance(value, bool):
            raise ConfigError(f"Invalid parameter type for '{key}', expected: integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError:
                pass
        raise ConfigError(f"Parameter '{key}' expects a number, not {value!r}")

    def get_size(self, key: str, default: Any = MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not MISSING:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            return parse_size(value, f"value for '{key}'")
        raise ConfigError(f"Parameter '{key}' expects a size, not {value!r}")

    def get_bool(self, key: str, default: Any = MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not MISSING:
            return value
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"Parameter '{key}' expects 'on' or 'off', not {value!r}")

    def get_choice(self, key: str, choices: tuple[str, ...], default: Any = MISSING) -> Any:
        value = self.get_str(key, default)
        if value is default and default is not MISSING:
            return value
        if value not in choices:
            raise ConfigError(
                f"Parameter '{key}' does not accept value '{value}'"
                f" (expected one of: {', '.join(choices)})"
            )
        return value

    def finish(self) -> None:
        """Fails on any option nobody took."""
        if self._values:
            key = next(iter(self._values))
            raise ConfigError(f"{self.where} does not support the option '{key}'")
