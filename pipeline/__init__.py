"""DiVA on Ray: distil a text LLM into a speech LLM using only ASR data."""

__version__ = "0.1.0"


class PipelineError(RuntimeError):
    """An expected failure (bad config, input or dataset): jobs print its message and exit 1."""
