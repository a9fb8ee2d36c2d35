"""pimoe.data: loaders of real data that ships with Python or installed packages (no download)."""

from pimoe.data.text import byte_splits, get_batch, load_pydoc_text

__all__ = ["byte_splits", "get_batch", "load_pydoc_text"]
