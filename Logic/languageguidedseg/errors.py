"""The one exception type whose message is shown to users as a single ``error:`` line."""

from typing import Optional


class LgsegError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do, in words that hold in every front
    end (the command line, Slicer, the web page), so it names no command-line flag.

    ``option`` names the setting at fault (``"model"``, ``"device"``, ``"axis"``, ``"slice"``, ...) where there is
    one: a command line adds its flag for it (:func:`languageguidedseg.options.error_line`).
    """

    def __init__(self, message: str, option: Optional[str] = None):
        super().__init__(message)
        self.option = option
