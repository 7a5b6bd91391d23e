"""shoptune: the 4th-place multilingual ShopBench recipe (Amazon KDD Cup 2024) as a pipeline."""


class UserError(Exception):
    """A mistake in the user's input: shown as one line, exit status 2, no traceback."""
