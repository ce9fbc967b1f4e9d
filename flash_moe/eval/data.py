"""Evaluation text: a text or JSONL file, a dataset through the ``datasets`` package, or the bundled sample.

The bundled sample (``flash_moe/data/sample.txt``) is a snapshot of this project's own Python source: it
ships with the package, works offline, and is Python like the demo model's training text (MIT, ours).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..files import CheckpointError, read_bytes

DATA = Path(__file__).resolve().parent.parent / "data"
SAMPLE = DATA / "sample.txt"
TEXT_LIMIT = 1 << 30
# Short names for the usual datasets: hub:wikitext2 is WikiText-2's raw test split.
HUB_ALIASES = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", "test")}


def read_text(data: str | Path | None = None, option: str = "--data") -> str:
    """The text to evaluate on: ``None`` (the bundled sample), a ``.txt`` (or any text) file, a ``.jsonl``
    file of objects with a ``"text"`` field (joined by blank lines), or ``hub:NAME[:CONFIG][@SPLIT]``, a
    dataset's ``"text"`` column loaded with the ``datasets`` package (``hub:wikitext2`` for WikiText-2)."""
    if data is None:
        data = SAMPLE
    if isinstance(data, str) and data.startswith("hub:"):
        return _hub_text(data[4:], option)
    path = Path(data).expanduser()
    try:
        raw = read_bytes(path, TEXT_LIMIT)
    except FileNotFoundError:
        raise ValueError(f"{option} {data}: no such file (a text or JSONL file, or hub:NAME)") from None
    except CheckpointError as e:
        raise ValueError(f"{option} {e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{option} {path}: not UTF-8 text ({e})") from None
    if path.suffix == ".jsonl":
        text = _jsonl_text(text, path, option)
    if not text.strip():
        raise ValueError(f"{option} {path}: no text in it")
    return text


def _jsonl_text(text: str, path: Path, option: str) -> str:
    parts = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{option} {path}:{n}: not JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f"{option} {path}:{n}: expected an object with a \"text\" string")
        parts.append(row["text"])
    return "\n\n".join(parts)


def _hub_text(spec: str, option: str) -> str:
    """``NAME[:CONFIG][@SPLIT]`` (default split: test) through ``datasets.load_dataset``."""
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    if name in HUB_ALIASES and not config:
        name, config, default_split = HUB_ALIASES[name]
        split = split or default_split
    if not name:
        raise ValueError(f"{option} hub:{spec}: no dataset name (hub:NAME[:CONFIG][@SPLIT])")
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{option} hub:{spec}: needs the datasets package (pip install 'flash-moe[eval]')") from None
    try:
        rows = datasets.load_dataset(name, config or None, split=split or "test")
    except Exception as e:  # offline, unknown name or config: one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{option} hub:{spec}: cannot load the dataset ({type(e).__name__}: {first})") from None
    if "text" not in rows.column_names:
        raise ValueError(f"{option} hub:{spec}: the dataset has no \"text\" column (columns: {rows.column_names})")
    # WikiText's rows are lines (headings, blank lines); joined back they are the article text.
    return "".join(t if t.endswith("\n") else t + "\n" for t in rows["text"])
