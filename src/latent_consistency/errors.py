"""The project's error type for mistakes a user can cause and fix."""


class UserError(Exception):
    """A bad path, size, step count, name or dataset given by the user.

    The message is one line saying what is wrong and what to do; the CLI prints it and exits 2.
    """
