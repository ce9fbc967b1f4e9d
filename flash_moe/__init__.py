"""flash_moe: run Mixture-of-Experts LLMs larger than memory by streaming the active experts from SSD.

The top level is shaped like mlx-lm's: ``load``, ``generate``, ``stream_generate``, ``convert``, ``make_sampler``.
``generate`` here is the function; the module that holds it is ``flash_moe.generation``.
"""

from .batch import batch_generate
from .convert import convert
from .generation import GenerationResponse, generate, stream_generate
from .eval import evaluate
from .load import LoadedModel, load
from .prompt_cache import PromptCache, load_prompt_cache, make_prompt_cache, save_prompt_cache
from .sample import make_logits_processors, make_sampler


def serve(model, **kwargs) -> None:
    """Run the OpenAI/Anthropic-compatible server (``flash-moe serve``); see ``flash_moe.server.serve``."""
    from .server import serve as run

    run(model, **kwargs)


__all__ = ["load", "generate", "stream_generate", "batch_generate", "serve", "convert", "make_sampler",
           "make_logits_processors", "GenerationResponse", "LoadedModel", "make_prompt_cache", "save_prompt_cache",
           "load_prompt_cache", "PromptCache", "evaluate"]
__version__ = "0.1.0"
