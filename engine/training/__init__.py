"""Training on Ray Train + DeepSpeed: one runner, then the three trainers (Stable Diffusion
fine-tuning, the grounding head, the detector)."""
