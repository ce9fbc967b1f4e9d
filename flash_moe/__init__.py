"""flash_moe: run Mixture-of-Experts LLMs larger than memory by streaming the active experts from SSD."""

from .eval import evaluate
from .load import LoadedModel, load

__all__ = ["load", "LoadedModel", "evaluate"]
__version__ = "0.1.0"
