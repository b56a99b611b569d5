"""The grounding head: its network, its loss, and its inputs (UNet features, text embeddings)."""
