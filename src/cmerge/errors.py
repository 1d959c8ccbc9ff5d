"""The one exception type users see: bad input, reported in one sentence, exit code 2."""


class CmergeError(Exception):
    """Bad input or a refused operation. The message is one sentence saying what to do.

    Raised before anything is changed on disk; the CLI prints it and exits with status 2.
    """

    exit_code = 2
