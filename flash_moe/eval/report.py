"""Results of ``evaluate`` as a table, JSON rows, and a plot of perplexity against expert bytes per token."""

from __future__ import annotations

import math
from pathlib import Path

from ..files import atomic_write_json


def _num(x, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table(rows) -> str:
    """A fixed-width table, one line per (model, K); the reference is marked with *."""
    head = f"{'model':<32} {'bits':>4} {'K':>3} {'perplexity':>10} {'KL':>8} {'top-1':>6} {'MB/token':>9} {'tok/s':>8} {'tokens':>7}"
    lines = [head]
    for r in rows:
        name = r.model if len(r.model) <= 31 else "…" + r.model[-30:]
        mb = None if r.bytes_per_token is None else r.bytes_per_token / 1e6
        lines.append(f"{name + ('*' if r.reference else ''):<32} {_num(r.bits, 'd'):>4} {r.k:>3} "
                     f"{_num(r.perplexity, '.3f'):>10} {_num(r.kl, '.4f'):>8} {_num(r.top1, '.3f'):>6} "
                     f"{_num(mb, '.3f'):>9} {_num(r.tok_per_s, '.1f'):>8} {r.tokens:>7}")
    lines.append("* reference for KL and top-1; MB/token: expert bytes read per decoded token")
    return "\n".join(lines)


def finite(value):
    """``value`` with every NaN or infinite float (a quantity that could not be measured) made None: JSON has none."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_json(rows, path: str | Path) -> None:
    """JSON rows ``{model, bits, k, perplexity, kl, top1, bytes_per_token, tok_per_s, tokens, ...}``
    (a value that could not be measured is null)."""
    atomic_write_json(Path(path), finite([r.as_dict() for r in rows]))


def plot(rows, path: str | Path, title: str = "perplexity against expert bytes per token") -> None:
    """One line per model (its K values as points, labelled), perplexity against MB read per token."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install 'flash-moe[eval]')") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(dict.fromkeys(r.model for r in rows))
    xs = []
    for n, model in enumerate(names):
        mine = sorted((r for r in rows if r.model == model and r.bytes_per_token is not None), key=lambda r: r.k)
        if not mine:
            continue
        bits = mine[0].bits
        x, y = [r.bytes_per_token / 1e6 for r in mine], [r.perplexity for r in mine]
        xs += x
        ax.plot(x, y, marker="o", label=f"{Path(model).name} ({bits}-bit)" if bits else Path(model).name)
        if n == 0 or len(names) <= 2:  # more labels would cover the lines; each line runs in K order
            for r, xi, yi in zip(mine, x, y):
                ax.annotate(f"K={r.k}", (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
    if xs and min(xs) > 0 and max(xs) / min(xs) > 8:
        ax.set_xscale("log")
    ax.set_xlabel("expert MB read per token")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
