"""The toy world: a drawn world of shapes (world) and the InstaGen loop measured on it (loop)."""
