"""Errors that mean "the user's input is wrong", as opposed to a bug in trl-flow.

The CLI turns these into one line on stderr and exit code 2, without a traceback.
"""


class UserInputError(ValueError):
    """Bad recipe key, file, column, reward or model path. The message names the culprit and the fix."""
