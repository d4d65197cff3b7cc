"""Diffusion domains: ``dllm/`` (masked-diffusion language models: d1's diffu-GRPO, IGPO) on the shared loop."""
