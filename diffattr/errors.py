"""The one exception type diffattr raises for bad user input."""


class DiffattrError(ValueError):
    """A problem with what the user passed: a file, a folder, a flag or a saved run.

    The message is one line that names the culprit and says how to fix it; the CLI prints it
    without a traceback.
    """
