"""User-facing errors.

Every failure the user can cause or fix is one of these: the message says what went wrong, names the file or option
involved and what to do. The CLI, UI and service print the message (never a traceback) for these.
"""


class InfiniteTalkError(Exception):
    """Base class: `str(err)` is a complete, user-readable message."""


class CheckpointError(InfiniteTalkError):
    """A model file is missing, corrupt, of the wrong model or in an unsupported format."""


class InputError(InfiniteTalkError):
    """A user input (image, video, audio, box, prompt) is unusable."""


class OptionError(InfiniteTalkError):
    """An option value is unknown, of the wrong type, or cannot run on this machine.

    `option` names the field it is about (a `LoadOptions`/`GenerateOptions` field name, None when no one field is) and
    `value` is the value refused, so that callers (the UI marks the control) never parse the message."""

    def __init__(self, message: str, option: str | None = None, value: object = None):
        super().__init__(message)
        self.option = option
        self.value = value


class NotLoadedError(InfiniteTalkError):
    """A component is used before `load_models` was called."""


class CancelledError(InfiniteTalkError):
    """The user cancelled a running job; finished chunks are kept."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a run: `str(err)` says exactly what was kept (the path of the finished frames, or that
    no video was written). A KeyboardInterrupt, so that every caller still stops."""


class StorageError(InputError):
    """The output's storage cannot take the run now (the folder cannot be written, too little free disk). For a
    long-running service this may pass (space freed, a mount back): a caller may retry instead of failing the job.
    `errno` says which fault it is (ENOSPC for too little free disk)."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno
