"""Seeing a run: trackers (TensorBoard, W&B), profiles from inside training, the goodput account across
restarts, per-process straggler reports, and `jaxscale report`."""
