"""The user's commands, one CLI: `iccl` (see `iccl --help`)."""
