"""Model families beyond the reference AttnRes model (SPEC section 1, "Model families").

One module per family: ``kimi`` (Kimi-Linear / Kimi K3: loading, component names) with its
modelling code ``kimi_modeling`` and the exact PyTorch versions of FLA's kernels
``kimi_torch_ops``.  The registry that loading / plan / quantize consult is not wired yet.
"""
