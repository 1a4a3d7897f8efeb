"""Measurements of data and samples: what benchmarks, tests and config comments rely on to judge
a modality's output (pitch of audio, normalization statistics), kept apart from the datasets."""
