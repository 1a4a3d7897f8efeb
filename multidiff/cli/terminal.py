"""What a ``multidiff`` command prints: one logging setup, and dependency noise that is not the
user's business filtered where it arises, each by its exact message and logger or module (never a
blanket ignore). ``verbose=true`` leaves all of it on, for debugging.
"""

from __future__ import annotations

import logging
import warnings

HANDLER_NAME = "multidiff-console"

# (message regex, module regex) of warnings filtered unless verbose, with why each does not apply.
DEPENDENCY_WARNINGS = (
    # Lightning 2.6's own pytree helper calls an API torch deprecated; nothing a user can change.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
    # The batch sampler *is* resumable (ResumableBatchSampler restarts mid-epoch from the loop's own
    # counters; tested to 1e-6); Lightning just cannot tell.
    (r".*your dataloader is not resumable", r"lightning\.pytorch\..*"),
    # The frozen text encoder and the EMA copy are in eval mode on purpose.
    (r".*module\(s\) in eval mode at the start of training", r"lightning\.pytorch\..*"),
)


class _DropAdvertisement(logging.Filter):
    """Lightning logs a tip to install a cloud logging product at every Trainer construction."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


_ADVERTISEMENT = _DropAdvertisement()


def setup(*, verbose: bool = False) -> None:
    """Configure the terminal for one command; safe to call more than once in a process.

    multidiff's own loggers get one handler (and do not propagate, so nothing prints twice);
    Lightning keeps the single console handler it installs for itself. The root logger is left
    alone: a root handler beside Lightning's is what printed each Lightning line twice.
    """
    log = logging.getLogger("multidiff")
    if not any(h.get_name() == HANDLER_NAME for h in log.handlers):
        handler = logging.StreamHandler()
        handler.set_name(HANDLER_NAME)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if verbose:
        rank_zero.removeFilter(_ADVERTISEMENT)
        return
    rank_zero.addFilter(_ADVERTISEMENT)  # idempotent for the same filter object
    for message, module in DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    try:  # a 0.0 s "Loading weights" bar for the frozen text encoder at every command
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
