"""Exception types that the CLI turns into `error: ...` and an exit status."""


class IsaretError(Exception):
    """Base class of every error that isaret reports to the user without a traceback."""

    exit_code = 1


class ConfigError(IsaretError):
    """An invalid config field, TOML file or command-line value."""

    exit_code = 2


class DataError(IsaretError):
    """Input data that cannot be read, parsed or split."""


class CheckpointError(IsaretError):
    """A checkpoint that cannot be written, read, verified or resumed from."""


class TrainingInterrupted(IsaretError):
    """Training stopped by SIGINT or SIGTERM after saving a checkpoint."""

    def __init__(self, signal_name: str, exit_code: int, message: str):
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = exit_code
