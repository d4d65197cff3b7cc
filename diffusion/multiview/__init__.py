"""Text-to-multiview diffusion RL at CPU scale (shared/methods/domains.md §2, §3): a numpy renderer of coloured 3D
primitives seen from 4 azimuths (render.py), caption prompts and pre-training images (data.py), a diffusers UNet
conditioned on all-MiniLM-L6-v2 caption embeddings (model.py) and its cached pre-training (pretrain.py), computable
rewards and tripwires (rewards.py), TensorBoard view grids (grids.py); MVC-ZigAL (zigal.py) and SePPO (seppo.py)."""
