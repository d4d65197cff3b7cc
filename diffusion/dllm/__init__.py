"""Masked-diffusion language models (LLaDA family) as a ``Policy`` of the shared loop.

``model.py`` (bidirectional transformer, MASK token, masked-diffusion SFT loss), ``sampler.py`` (LLaDA's
low-confidence remasking sampler with frozen hint positions), ``policy.py`` (``MaskedDiffusionPolicy``: d1's
one-step log-prob estimator with a mask seed per inner epoch), ``estimators.py`` (exact sequence probability by
enumeration; the one-step and coupled complementary-mask estimators), ``data.py`` (the chain-sum task),
``module.py`` (the domain module). Spec: shared/methods/domains.md §0.5 and §1.
"""
