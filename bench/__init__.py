"""bench: width vs depth pruning of LLaMA-style LLMs at matched parameter budgets.

One run is one cell (model x method x ratio):

    python -m bench model=smollm2-135m method=depth_taylor ratio=0.2

See README.md for the sweep, the report and how to add a method.
"""

__version__ = "0.1.0"


class BenchError(Exception):
    """A user-facing error: bad config or missing input. The CLI prints it as one line."""
