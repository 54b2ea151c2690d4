"""gptlab: from a plain text file to a GPT you trained yourself."""

from gptlab.errors import GptlabError

__version__ = "0.1.0"

__all__ = ["GptlabError", "__version__"]
