"""The one exception type the CLI turns into a one-line message and exit code 1."""


class VitDeployError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do next."""
