"""lm-evaluation-harness adapter: ``--model flash_moe --model_args path=M,k=4`` (``pip install 'flash-moe[eval]'``).

lm_eval finds a model class only once the module that registers it is imported, and it discovers none from
other packages, so run it through this module, which registers ``flash_moe`` and then hands the command
line to lm_eval unchanged:

    python -m flash_moe.lm_eval_adapter --model flash_moe --model_args path=M,k=4 --tasks mmlu

(``import flash_moe.lm_eval_adapter`` before ``lm_eval.simple_evaluate`` does the same in Python.)
Model arguments: ``path`` (folder or hub id), ``k`` (experts per token), ``max_length`` (tokens a request
may see, default 2048), ``dtype``, ``cache_experts``.
"""

from __future__ import annotations

import mlx.core as mx

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - the message is the point
    raise ImportError("the lm-eval adapter needs lm-eval: pip install 'flash-moe[eval]'") from None

from tqdm.auto import tqdm

from .eval.perplexity import token_nlls
from .load import load

# lm_eval passes these to every model; a single-sequence MLX model has no use for them.
IGNORED = ("batch_size", "max_batch_size", "device")


@register_model("flash_moe")
class FlashMoeLM(TemplateLM):
    """A flash_moe model as lm_eval sees it: log-likelihoods (one forward per request), rolling
    log-likelihoods (``evaluate``'s windows) and greedy generation with stop strings."""

    def __init__(self, path=None, k=None, max_length=2048, dtype=None, cache_experts="auto", model=None, **kwargs):
        super().__init__()
        unknown = sorted(set(kwargs) - set(IGNORED))
        if unknown:
            raise ValueError(f"--model_args: unknown argument(s) {unknown} (path, k, max_length, dtype, cache_experts)")
        if model is None:
            if not path:
                raise ValueError("--model_args: path=MODEL is required")
            model = load(path, dtype=dtype, cache_experts=cache_experts)
        self.model = model
        if k is not None:
            model.set_experts_per_token(int(k))
        self.max_length = int(max_length)
        self.tokenizer = model.tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.model.path)

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return list(self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)))

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        out = []
        for strings, context, continuation in tqdm(requests, disable=disable_tqdm, desc="loglikelihood"):
            ids = (list(context) + list(continuation))[-(self.max_length + 1):]
            n = len(continuation)
            if n == 0:
                out.append((0.0, True))
                continue
            logits = self.model(mx.array(ids[:-1], mx.int32)[None], self.model.make_cache())[0, -n:].astype(mx.float32)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            target = mx.array(ids[-n:], mx.int32)
            total = mx.take_along_axis(logprobs, target[:, None], axis=-1).sum()
            greedy = mx.all(mx.argmax(logprobs, axis=-1) == target)
            mx.eval(total, greedy)
            out.append((total.item(), bool(greedy.item())))
            if self.cache_hook is not None:
                self.cache_hook.add_partial("loglikelihood", strings, out[-1])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: every token scored once, the first given the end-of-text token,
        in windows of ``max_length`` tokens that overlap by half (as ``flash-moe eval`` scores)."""
        out = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="loglikelihood_rolling"):
            ids = [self.prefix_token_id] + self.tok_encode(text)
            out.append(-float(token_nlls(self.model, ids, self.max_length, max(1, self.max_length // 2)).sum()))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="generate_until"):
            options = gen_kwargs or {}
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = 0.0 if options.get("do_sample") is False else float(options.get("temperature") or 0.0)
            text = self.model.generate(context, max_tokens=int(options.get("max_gen_toks", 256)),
                                       temperature=temperature, stop=until, chat=False)
            out.append(str(text))
        return out


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
