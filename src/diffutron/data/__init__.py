"""Where text comes from and how it becomes training data."""

from diffutron.data.bundled import bundled_documents
from diffutron.data.sources import Document, read_documents

__all__ = ["Document", "bundled_documents", "read_documents"]
