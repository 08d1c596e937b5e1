"""The one exception type whose message is shown to users as a single ``error:`` line."""


class LgsegError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""
