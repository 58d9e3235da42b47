"""cwdpo: Cooling-Weighted DPO for vision-language models."""

__version__ = "0.1.0"
