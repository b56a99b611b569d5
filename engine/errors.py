"""The one base of every error a user can cause and fix.

Each stage raises its own subclass (ConfigError, ShardError, DatasetError, ...) with a message
that names the problem and the fix; the CLI and every job catch `UserError` alone, print that one
line and exit 2. Anything else is a bug in the engine and keeps its traceback.
"""


class UserError(Exception):
    """Bad input, a missing file, a cluster too small: the message says what to change."""


class ConfigError(UserError, ValueError):
    """A config the user wrote is wrong; the message names the key and the fix."""
