"""Where the engine runs: the Ray cluster, whole-file writes to any storage, fault injection."""
