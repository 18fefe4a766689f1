"""The one exception type for mistakes in the user's input."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (a missing folder, an unknown name, a bad value).

    The message is one line that names the cause and the fix; front ends print it without a
    traceback. Anything else that escapes is a bug and keeps its traceback.
    """
