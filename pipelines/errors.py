"""Project exceptions: errors a user can fix, with a message that says how.

The CLI prints `LLMOpsError` messages on one line (no traceback) and exits non-zero.
"""


class LLMOpsError(Exception):
    """An error the user can fix; the message names the input, the problem and the fix."""

    exit_code = 1


class ParamsError(LLMOpsError):
    """params.yaml (or an override) is invalid."""

    exit_code = 2


class DataError(LLMOpsError):
    """Input data is missing, empty or has the wrong shape."""


class ValidationFailed(LLMOpsError):
    """A blocking data expectation failed; the message is the short report."""
