"""choline syncer service:

Moves code, data, checkpoints and models through object storage; owns datasets, checkpoints, models."""
