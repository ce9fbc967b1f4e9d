"""``flash-moe demo``: the whole streaming path on a small model that ships with the package, offline.

The shipped files are a Hugging Face-layout Qwen3.5-MoE checkpoint (briefly trained on the Python
standard library's source, see README.md here) and its tokenizer. The first run copies them under
``$FLASH_MOE_HOME`` (default ``~/.cache/flash_moe``), converts them with ``flash_moe.convert`` to
4-bit packed experts, and later runs reuse that folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

ASSETS = Path(__file__).parent
SKIP = {"__init__.py", "__pycache__", "README.md", "training_log.json"}


def home() -> Path:
    return Path(os.environ.get("FLASH_MOE_HOME") or "~/.cache/flash_moe").expanduser()


def _fingerprint() -> str:
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(ASSETS.iterdir()):
        if f.name not in SKIP and f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def build(rebuild: bool = False, progress: bool = True, out=sys.stderr) -> Path:
    """The converted demo folder, built on first use (or when the shipped assets changed); ``progress=False``
    builds it without a word."""
    from ..convert import convert

    if not (ASSETS / "model.safetensors").exists():
        raise FileNotFoundError(f"{ASSETS}: the demo checkpoint (model.safetensors) is missing from this install")
    root = home() / "demo"
    hf, converted, stamp = root / "hf", root / "converted", root / "assets.stamp"
    fp = _fingerprint()
    if not rebuild and (converted / "layout.json").exists() and stamp.exists() and stamp.read_text() == fp:
        return converted
    if progress:
        print(f"building the demo model under {root} (once)", file=out)
    shutil.rmtree(root, ignore_errors=True)
    hf.mkdir(parents=True)
    for f in ASSETS.iterdir():
        if f.name not in SKIP and f.is_file():
            shutil.copyfile(f, hf / f.name)
    convert(hf, converted, bits=4, group_size=64, progress=progress)
    stamp.write_text(fp)
    return converted


def run_demo(prompt: str = "def main", max_tokens: int = 80, timing: bool = True, rebuild: bool = False,
             out=sys.stdout) -> str:
    """Build (once), load with streamed experts, generate, and print the timing table and expert usage."""
    from .. import load
    from ..timing import PhaseTimer

    folder = build(rebuild)
    model = load(folder)
    print(f"{model}\nprompt: {prompt!r}\n", file=out)
    timer = PhaseTimer(model).install() if timing else None
    text, last = "", None
    print(prompt, end="", file=out)
    for r in model.stream_generate(prompt, max_tokens=max_tokens, timer=timer):
        print(r.text, end="", flush=True, file=out)
        text, last = text + r.text, r
    print("\n", file=out)
    if last:
        print(f"prompt {last.prompt_tokens} tokens at {last.prompt_tps:.1f} tok/s, generated {last.generation_tokens} "
              f"tokens at {last.generation_tps:.1f} tok/s, peak memory {last.peak_memory:.3f} GB", file=out)
    if timer:
        timer.uninstall()
        print(timer.table(), file=out)
    usage = model.stats.usage
    share = _top_share(usage)
    print(f"expert usage: the top 20% of experts took {100 * share:.0f}% of this run's activations", file=out)
    model.close()
    return text


def _top_share(usage) -> float:
    """Mean over MoE layers of the activation share of each layer's top 20% experts."""
    import numpy as np

    rows = [r for r in np.asarray(usage) if r.sum() > 0]
    if not rows:
        return 0.0
    k = max(1, len(rows[0]) // 5)
    return float(np.mean([np.sort(r)[::-1][:k].sum() / r.sum() for r in rows]))
