"""What every part of a run stands on: the device mesh and each process's share (sharding), PyTorch
weight files (weights), the train state, the workdir's layout and checkpoints (workdir), atomic
writes and checksums (disk), the XLA cache and the distributed start."""
