"""mdts: a fourth multidiff modality (captioned multichannel time series) built outside the package.

Import path: put ``examples/timeseries`` on ``PYTHONPATH``; configs: join ``examples/timeseries``
to Hydra's search path (``hydra.searchpath=[file://.../examples/timeseries]``); trust it with
``trusted_targets=[mdts.]``. See ``docs/new_modality.md``.
"""

from mdts.adapter import TimeSeriesAdapter
from mdts.data import materialize_sines, sines_dataset

__all__ = ["TimeSeriesAdapter", "materialize_sines", "sines_dataset"]
