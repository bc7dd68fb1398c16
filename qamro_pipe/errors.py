"""The one exception type the CLI turns into a clean error line."""


class QamroError(Exception):
    """A problem the user can act on; the message names the file and what is wrong."""


class CacheError(QamroError):
    """A cache file that is missing, malformed, incomplete or made under another config."""


class DataError(QamroError):
    """A dataset, manifest or audio file that cannot be read as declared."""


class Interrupted(QamroError):
    """Ctrl-C, stopped cleanly: the message says what is safe and how to resume."""
