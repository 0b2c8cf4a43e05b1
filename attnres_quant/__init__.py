"""attnres_quant: quantization study tool for Attention-Residual language models."""

__version__ = "0.1.0"
