"""The ``multidiff`` command: ``multidiff train ...`` and ``multidiff generate ...``."""
