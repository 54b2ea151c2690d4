"""The one exception type for mistakes a user can make (the CLI prints it as one line, exit 2)."""


class GptlabError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""


class TrainingInterrupted(GptlabError):
    """Ctrl-C or SIGTERM: the run saved its state and stopped; the CLI exits with 130."""
