"""Class labels as a condition; the extra index ``num_classes`` is the null label for CFG."""

from __future__ import annotations

import torch

from multidiff.core.cond import Cond


class LabelConditioner:
    """Maps integer labels (or strings naming them) to ``Cond(labels=...)``.

    Args:
        num_classes: number of real classes; label ``num_classes`` means "no label".
        class_names: optional names; then prompts may be those names (e.g. ``"7"``).
    """

    def __init__(self, num_classes: int, class_names: list[str] | None = None) -> None:
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.device = torch.device("cpu")

    def to(self, device) -> LabelConditioner:
        self.device = torch.device(device)
        return self

    def _index(self, item) -> int:
        if isinstance(item, str):
            if item not in self.class_names:
                raise ValueError(f"unknown class {item!r}; known classes: {', '.join(self.class_names)}")
            return self.class_names.index(item)
        i = int(item)
        if not 0 <= i < self.num_classes:
            raise ValueError(f"label {i} out of range 0..{self.num_classes - 1}")
        return i

    def encode(self, items) -> Cond:
        labels = torch.tensor([self._index(i) for i in items], dtype=torch.long, device=self.device)
        return Cond(labels=labels)

    __call__ = encode

    def null(self, batch: int = 1) -> Cond:
        return Cond(labels=torch.full((batch,), self.num_classes, dtype=torch.long, device=self.device))
