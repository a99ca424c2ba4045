"""Running data through a graph: calibration (statistics), fine-tuning (recovery training,
distillation, DDP) and the data sources they read."""
