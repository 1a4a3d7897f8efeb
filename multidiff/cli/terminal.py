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
    # diffusers' AutoencoderOobleck (Stable Audio's VAE) builds its layers with torch's older weight_norm API.
    (r"`torch\.nn\.utils\.weight_norm` is deprecated", r"torch\.nn\.utils\.weight_norm"),
)


class _DropAdvertisement(logging.Filter):
    """Lightning logs a tip to install a cloud logging product at every Trainer construction."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


_ADVERTISEMENT = _DropAdvertisement()


_hf_bar_switched_off = False  # whether setup() switched transformers' progress bar off (verbose turns it back)


def setup(*, verbose: bool = False) -> None:
    """Configure the terminal for one command; the only place multidiff installs warning filters.

    Each call sets the whole state afresh: calling it again stacks no handler or filter, and a
    later call with another ``verbose`` undoes what the earlier one did (in-process runs, tests).

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
    _show_dependency_noise(verbose)


def _show_dependency_noise(shown: bool) -> None:
    """Show (``verbose``) or filter the dependency messages listed above."""
    global _hf_bar_switched_off
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if shown:
        rank_zero.removeFilter(_ADVERTISEMENT)
    else:
        rank_zero.addFilter(_ADVERTISEMENT)  # idempotent for the same filter object
    for message, module in DEPENDENCY_WARNINGS:
        # filterwarnings drops an identical entry before putting this one first: one entry per action
        # and pattern however often this runs, and the latest call's action decides
        warnings.filterwarnings("default" if shown else "ignore", message=message, module=module)
    try:  # a 0.0 s "Loading weights" bar for the frozen text encoder at every command
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    if not shown:
        _hf_bar_switched_off = _hf_bar_switched_off or hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    elif _hf_bar_switched_off:
        hf_logging.enable_progress_bar()
        _hf_bar_switched_off = False
