"""Models, one module per kind: the diffusion pipeline and its single-file checkpoints, detectors,
the grounding head, and the box operations they share."""
