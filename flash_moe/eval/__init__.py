"""Measuring what K and bits cost: perplexity, KL and top-1 (``evaluate``), tool-call validity and ``bench``."""

from .perplexity import Row, evaluate, token_nlls, windows

__all__ = ["evaluate", "Row", "token_nlls", "windows"]
