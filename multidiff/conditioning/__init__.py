"""Prompts and labels -> :class:`multidiff.core.cond.Cond`."""

from multidiff.conditioning.dropout import drop_condition
from multidiff.conditioning.labels import LabelConditioner
from multidiff.conditioning.text import TextConditioner

__all__ = ["LabelConditioner", "TextConditioner", "drop_condition"]
