"""The project's error type for mistakes a user can cause and fix."""


class UserError(Exception):
    """A bad path, size, step count, name or dataset given by the user.

    The message is one line saying what is wrong and what to do; the CLI prints it and exits 2.
    """


def first_line(err: BaseException) -> str:
    """An exception's message in one line (its first), or its type's name: a library's error quoted in a UserError."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
