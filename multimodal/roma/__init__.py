"""ROMA: RL that keeps a VLM right when its image is blurred, compressed or downscaled (arXiv 2605.09262)."""
