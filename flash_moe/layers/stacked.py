"""Several linear projections of the same input as one matmul: one kernel launch instead of several.

Decoding is bound by launches (issue 20). The projections' rows are stacked once, at the first call; each output
row is still its own dot product, so the result is the separate projections'. The modules then hold views of
the stacked arrays (no second copy), and a module whose weights were replaced since is noticed and restacked.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def _names(module) -> tuple[str, ...] | None:
    if isinstance(module, nn.QuantizedLinear):
        return ("weight", "scales", "biases") if "biases" in module else ("weight", "scales")
    if type(module) is nn.Linear:
        return ("weight",)
    return None


class StackedLinear:
    """``StackedLinear(modules)(x)`` == ``[m(x) for m in modules]``; ``ok`` is False when they cannot stack
    (different kinds or quantization, a bias term), and then it calls them one by one."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        names = [_names(m) for m in modules]
        keys = {(type(m), n, getattr(m, "group_size", None), getattr(m, "bits", None), getattr(m, "mode", None))
                for m, n in zip(modules, names)}
        self.ok = names[0] is not None and len(keys) == 1 and not any("bias" in m for m in modules)
        self.names = names[0]
        self.views = None

    def _stack(self) -> None:
        stacked = {n: mx.concatenate([m[n] for m in self.modules]) for n in self.names}
        mx.eval(stacked)
        self.arrays, self.splits, rows = stacked, [], 0
        for m in self.modules[:-1]:
            rows += m["weight"].shape[0]
            self.splits.append(rows)
        bounds = [0, *self.splits, stacked["weight"].shape[0]]
        for m, a, b in zip(self.modules, bounds, bounds[1:]):
            for n in self.names:
                setattr(m, n, stacked[n][a:b])  # a view: the separate copy is freed
        self.views = [[m[n] for n in self.names] for m in self.modules]
        mx.eval(self.views)

    def __call__(self, x: mx.array) -> list[mx.array]:
        if not self.ok:
            return [m(x) for m in self.modules]
        if self.views is None or any(m[n] is not v for m, vs in zip(self.modules, self.views)
                                     for n, v in zip(self.names, vs)):
            self._stack()
        m, a = self.modules[0], self.arrays
        if len(self.names) == 1:
            y = x @ a["weight"].T
        else:
            y = mx.quantized_matmul(x, a["weight"], scales=a["scales"], biases=a.get("biases"), transpose=True,
                                    group_size=m.group_size, bits=m.bits, mode=m.mode)
        return mx.split(y, self.splits, axis=-1)


def stacked(owner: nn.Module, attr: str, modules: list[nn.Module]) -> StackedLinear:
    """The StackedLinear of ``modules`` kept on ``owner`` (a plain attribute, not a parameter); made anew when
    the modules themselves were replaced (``nn.quantize``, a new model tree)."""
    s = getattr(owner, attr, None)
    if s is None or len(s.modules) != len(modules) or any(a is not b for a, b in zip(s.modules, modules)):
        s = StackedLinear(modules)
        object.__setattr__(owner, attr, s)
    return s
