"""The one exception type for problems a user can cause and fix (bad file, wrong option, corrupt data).

The CLI prints its message and exits with status 2 instead of showing a traceback, so every message
must name the file (or option) at fault and say what to do about it.
"""


# What a conversion does with a bad item (`iccl convert --on-error`): here, where the command line
# can read it without importing the conversion engine.
ON_ERROR = ("stop", "skip")


class DataError(Exception):
    """A user-fixable problem with input data, a converted dataset, or an option."""
