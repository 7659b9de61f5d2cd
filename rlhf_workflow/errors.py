"""The one exception type for mistakes a user can make (bad config, bad data, missing file).

The CLI prints it as one line and exits with code 2; anything else is a bug and raises.
"""


class UserError(Exception):
    """A problem in the user's input, reported as one clear line without a traceback."""
