"""pimoe.data: loaders of real data that ships with Python or installed packages (no download)."""

from pimoe.data.digits import Split, digits_split, load_digits
from pimoe.data.text import byte_splits, get_batch, load_pydoc_text

__all__ = ["Split", "byte_splits", "digits_split", "get_batch", "load_digits", "load_pydoc_text"]
