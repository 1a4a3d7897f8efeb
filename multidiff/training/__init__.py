"""Lightning training: one modality-free LightningModule, a DataModule, EMA and callbacks."""
