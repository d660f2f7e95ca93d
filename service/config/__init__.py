"""Settings: each declared once (service.config.settings), read from the environment and
checked at start-up; the CLI's flags and docs/configuration.md are generated from them.
Standard library only."""

from service.config.declaring import (
    COMMANDS,
    Setting,
    SettingsError,
    env_name,
    env_value,
    redact,
    shown,
)
from service.config.settings import (
    DEFAULT_BAR_URL,
    EVENT_LOOPS,
    LOG_FORMATS,
    LOG_LEVELS,
    OTHER_VARIABLES,
    Settings,
    declared,
    is_known_variable,
    unknown_variables,
)

__all__ = [
    "COMMANDS",
    "DEFAULT_BAR_URL",
    "EVENT_LOOPS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "OTHER_VARIABLES",
    "Setting",
    "Settings",
    "SettingsError",
    "declared",
    "env_name",
    "env_value",
    "is_known_variable",
    "redact",
    "shown",
    "unknown_variables",
]
