"""InstaGen Engine: synthesis of object-detection datasets with Stable Diffusion, after InstaGen (CVPR 2024)."""
__version__ = "0.1.0"
