"""Typed errors for user mistakes. Library code raises these; only the CLI turns them
into a one-line message and exit code 2."""


class LowbitError(Exception):
    """A problem the user can fix; the message says what was wrong and what to do."""


class ConfigError(LowbitError):
    """Invalid option or combination of options."""


class ModelError(LowbitError):
    """The model cannot be found, read or quantized."""


class DataError(LowbitError):
    """Calibration or evaluation text is missing, unreadable or too short."""


class CheckpointError(LowbitError):
    """A quantized checkpoint is missing, truncated, corrupt or not ours."""


class AssetError(LowbitError):
    """An offline asset could not be fetched or failed its checksum."""
