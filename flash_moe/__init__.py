"""flash_moe: run Mixture-of-Experts LLMs larger than memory by streaming the active experts from SSD."""

from .load import LoadedModel, load
from .prompt_cache import PromptCache, load_prompt_cache, make_prompt_cache, save_prompt_cache

__all__ = ["load", "LoadedModel", "make_prompt_cache", "save_prompt_cache", "load_prompt_cache", "PromptCache"]
__version__ = "0.1.0"
