"""Folder datasets with captions and the embedded default datasets."""
