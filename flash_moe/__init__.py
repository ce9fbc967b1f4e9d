"""flash_moe: run Mixture-of-Experts LLMs larger than memory by streaming the active experts from SSD."""

from .batch import batch_generate
from .load import LoadedModel, load
from .prompt_cache import PromptCache, load_prompt_cache, make_prompt_cache, save_prompt_cache


def serve(model, **kwargs) -> None:
    """Run the OpenAI/Anthropic-compatible server (``flash-moe serve``); see ``flash_moe.server.serve``."""
    from .server import serve as run

    run(model, **kwargs)


__all__ = ["load", "LoadedModel", "batch_generate", "make_prompt_cache", "save_prompt_cache", "load_prompt_cache",
           "PromptCache", "serve"]
__version__ = "0.1.0"
