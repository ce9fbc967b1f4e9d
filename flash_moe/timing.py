"""Per-phase decode timing (``flash-moe generate --timing``), like the seed engine's per-layer breakdown.

MLX is lazy, so a phase's time is only visible if it is evaluated at its end: ``PhaseTimer.install``
wraps each layer's mixer and MoE block (from outside; the model code is unchanged) and evaluates
their outputs. That adds a sync per phase, a few percent on a laptop; leave timing off for speed.
"""

from __future__ import annotations

import time
from collections import defaultdict

import mlx.core as mx

PHASES = ("attention", "gdn", "routing", "expert_io", "expert_compute", "comm", "shared_expert", "sampling", "other")


class _Timed:
    """Stands in for a module: calls it, evaluates its output, books the time."""

    def __init__(self, timer, inner, phase, layer):
        self.timer, self.inner, self.phase, self.layer = timer, inner, phase, layer

    def __call__(self, *args):
        t = self.timer
        if self.phase == "moe":
            t.moe_start = time.perf_counter()
            t.io_before = t.store.stats.seconds.sum() if t.store else 0.0
        start = time.perf_counter()
        out = self.inner(*args)
        mx.eval(out)
        end = time.perf_counter()
        if self.phase == "experts":
            io = (t.store.stats.seconds.sum() - t.io_before) if t.store else 0.0
            t.add(self.layer, "routing", t.routed_at - t.moe_start)
            t.add(self.layer, "expert_io", io)
            t.add(self.layer, "expert_compute", end - t.routed_at - io)
            t.experts_end = end
        elif self.phase == "comm":  # expert-parallel: the all_sum, and the wait for the slowest rank
            t.add(self.layer, "comm", end - t.experts_end)
            t.experts_end = end
        elif self.phase == "moe":
            t.add(self.layer, "shared_expert", end - t.experts_end)
        else:
            t.add(self.layer, self.phase, end - start)
        return out


class _TimedExperts(_Timed):
    def __call__(self, x, inds, scores):
        mx.eval(inds, scores)  # routing ends when the expert ids are known
        self.timer.routed_at = time.perf_counter()
        return super().__call__(x, inds, scores)


class PhaseTimer:
    """Decode time by layer and phase; each generation it is passed to restarts the count."""

    def __init__(self, model):
        self.model, self.store = model, getattr(model, "store", None)
        self.times = defaultdict(float)  # (layer, phase) -> seconds, decode only
        self.tokens, self.decoding = 0, False
        self.wall = 0.0
        self._io0 = None
        self._patched = []

    def add(self, layer, phase, seconds):
        if self.decoding:
            self.times[(layer, phase)] += max(seconds, 0.0)

    def install(self) -> "PhaseTimer":
        for i, layer in enumerate(self.model.model.layers):
            linear = getattr(layer, "is_linear", False)  # models through mlx-lm have attention only
            name = "linear_attn" if linear else "self_attn"
            self._patch(layer, name, _Timed(self, getattr(layer, name), "gdn" if linear else "attention", i))
            block = next((n for n in ("mlp", "block_sparse_moe") if hasattr(layer, n)), None)
            moe = getattr(layer, block) if block else None
            # flash_moe's block holds its experts provider; an mlx-lm block holds it inside its StreamedSwitch
            # (``switch_mlp``, or ``experts`` in gpt-oss)
            owner = getattr(moe, "switch_mlp", moe)
            if hasattr(getattr(owner, "experts", None), "experts"):
                owner = owner.experts
            if hasattr(owner, "experts"):
                experts = owner.experts
                if hasattr(experts, "local"):  # distributed.ExpertParallel: this rank's experts, then the all_sum
                    self._patch(experts, "local", _TimedExperts(self, experts.local, "experts", i))
                    self._patch(owner, "experts", _Timed(self, experts, "comm", i))
                else:
                    self._patch(owner, "experts", _TimedExperts(self, experts, "experts", i))
                self._patch(layer, block, _Timed(self, moe, "moe", i))
        return self

    def _patch(self, owner, name, wrapper):
        # A plain attribute shadows the module's child entry; deleting it restores the module.
        object.__setattr__(owner, name, wrapper)
        self._patched.append((owner, name))

    def uninstall(self) -> None:
        for owner, name in reversed(self._patched):
            object.__delattr__(owner, name)
        self._patched.clear()

    def start_prefill(self):
        self.times.clear()
        self.tokens, self.decoding, self.wall = 0, False, 0.0

    def start_decode(self):
        self.decoding = True
        self._io0 = self.store.stats.snapshot() if self.store else None
        self._t_last = time.perf_counter()  # the first token's forward counts too

    def mark_forward(self, logits):
        mx.eval(logits)
        self._t_sample = time.perf_counter()

    def mark_token(self):
        now = time.perf_counter()
        self.times[(None, "sampling")] += now - self._t_sample
        self.wall += now - self._t_last
        self._t_last = now
        self.tokens += 1

    def summary(self) -> dict:
        """ms per token by phase, per layer type and in total, plus I/O per token."""
        n = max(self.tokens, 1)
        kinds = {i: ("GDN" if getattr(l, "is_linear", False) else "full") for i, l in enumerate(self.model.model.layers)}
        rows = defaultdict(lambda: defaultdict(float))
        for (layer, phase), s in self.times.items():
            rows["GDN layers" if kinds.get(layer) == "GDN" else "full-attn layers" if layer is not None else "head"][phase] += s
        total = {p: sum(r[p] for r in rows.values()) for p in PHASES}
        total["other"] = max(self.wall - sum(total.values()), 0.0)
        io = self.store.stats.snapshot().delta(self._io0).totals() if self.store and self._io0 is not None else {}
        return {
            "tokens": self.tokens, "ms_per_token": 1e3 * self.wall / n,
            "rows": {k: {p: 1e3 * v / n for p, v in r.items()} for k, r in rows.items()},
            "total": {p: 1e3 * v / n for p, v in total.items()},
            "layers": {"GDN": sum(v == "GDN" for v in kinds.values()), "full": sum(v == "full" for v in kinds.values())},
            "io": io, "tok_per_s": n / self.wall if self.wall else 0.0,
        }

    def table(self) -> str:
        s = self.summary()
        if not s["tokens"]:  # every rate below would be 0/0
            return "timing: no tokens were generated, nothing to show"
        parallel = getattr(self.model, "parallel", None) is not None
        cols = [c for c in PHASES if c != "comm" or parallel]  # comm: expert-parallel runs only
        lines = [f"{'ms/token':<18}" + "".join(f"{c:>15}" for c in cols) + f"{'total':>10}"]
        for name, row in sorted(s["rows"].items()):
            lines.append(f"{name:<18}" + "".join(f"{row.get(c, 0.0):>15.3f}" for c in cols) + f"{sum(row.values()):>10.3f}")
        lines.append(f"{'all':<18}" + "".join(f"{s['total'][c]:>15.3f}" for c in cols) + f"{sum(s['total'].values()):>10.3f}")
        n_gdn, n_full = s["layers"]["GDN"], s["layers"]["full"]
        per = [f"per GDN layer {sum(s['rows'].get('GDN layers', {}).values()) / max(n_gdn, 1):.3f} ms",
               f"per full-attn layer {sum(s['rows'].get('full-attn layers', {}).values()) / max(n_full, 1):.3f} ms"]
        lines.append("  ".join(per))
        io, n = s["io"], max(s["tokens"], 1)
        if io:
            lines.append(
                f"expert reads/token: {io['experts'] / n:.1f} experts, {io['bytes'] / n / 1e6:.2f} MB, "
                f"{1e3 * io['seconds'] / n:.3f} ms, page-cache hit {100 * io['hit_rate']:.0f}% "
                f"({io['gb_per_s']:.2f} GB/s)"
            )
        lines.append(f"decode: {s['tokens']} tokens, {s['ms_per_token']:.2f} ms/token, {s['tok_per_s']:.2f} tok/s")
        return "\n".join(lines)
