"""MoE families flash_moe runs through mlx-lm, routed experts streamed (issue 16 proof).

Each family: a tiny random transformers checkpoint (tests/hf_families.py), converted by ``flash_moe.convert``
at 16 bits (float32) and at 4 bits, loaded with ``flash_moe.load``. At 16 bits the streamed model is held to
transformers (full sequence, cached decode, a 32-token greedy continuation, another K through the family's
own routing); at 4 bits to mlx-lm's own resident model on the same quantized weights.
"""

from __future__ import annotations

import json
import shutil
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

pytest.importorskip("mlx_lm")

import hf_families
import hf_models
from conftest import derive_seed, seed_note

import flash_moe
from flash_moe.convert import convert
from flash_moe.families import EXTRA, StreamedSwitch, architecture, build
from flash_moe.files import CheckpointError

REL_TOL = 1e-4
ROUTER_MARGIN = 1e-4
ARGMAX_MARGIN = 1e-3
STREAMED = ["qwen3_moe", "mixtral", "deepseek_v3", "glm4_moe", "gpt_oss", "kimi_k2", "qwen2_moe", "olmoe", "dots1"]


class Family:
    def __init__(self, name, tmp):
        self.name, self.seed = name, derive_seed("family " + name)
        self.src, self.torch_model = hf_families.build(name, tmp / "hf", seed=self.seed)
        self.vocab = self.torch_model.config.vocab_size
        self.dst16 = convert(self.src, tmp / "b16", bits=16, dtype="float32", progress=False)
        self.dst4 = convert(self.src, tmp / "b4", bits=4, group_size=64, dtype="float32", progress=False)
        self.model = flash_moe.load(self.dst16)

    def note(self, seed=None) -> str:
        return f"[{self.name}] " + seed_note(self.seed if seed is None else seed)

    def reference(self, tokens: np.ndarray, model=None) -> np.ndarray:
        with torch.no_grad():
            return (model or self.torch_model)(input_ids=torch.from_numpy(tokens)).logits.numpy()

    def decisive_tokens(self, gen, shape, model=None) -> np.ndarray:
        for _ in range(20):
            tokens = hf_models.random_tokens(gen, self.vocab, shape)
            if hf_families.routing_margin(model or self.torch_model, torch.from_numpy(tokens)) > ROUTER_MARGIN:
                return tokens
        raise AssertionError(f"no decisive input in 20 draws {self.note()}")


@pytest.fixture(scope="module", params=STREAMED)
def family(request, tmp_path_factory):
    f = Family(request.param, tmp_path_factory.mktemp(request.param))
    yield f
    f.model.close()


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def run(model, tokens: np.ndarray, cache=None) -> np.ndarray:
    return np.array(model(mx.array(tokens.astype(np.int32)), cache=cache).astype(mx.float32))


def greedy(model, prompt: np.ndarray, n: int) -> list[int]:
    """Greedy tokens through flash_moe's own generation loop (make_cache, prefill, one token a step)."""
    from flash_moe.generation import generate_step

    steps = generate_step(mx.array(prompt[0].astype(np.int32)), model, max_tokens=n)
    return [token for token, _ in steps]


def test_every_expert_layer_is_streamed(family):
    streamed = [p for p, m in family.model.model.named_modules() if isinstance(m, StreamedSwitch)]
    moe = [i for i, layer in enumerate(family.model.model.layers)
           if any(isinstance(m, StreamedSwitch) for _, m in layer.named_modules())]
    assert len(streamed) == len(moe) == len(family.model.store.layout.moe_layers) > 0
    assert moe == family.model.store.layout.moe_layers
    assert "streamed" in repr(family.model) and family.name in repr(family.model)
    assert family.model.config.vocab_size == family.vocab


def test_full_sequence_logits(family, seed):
    gen = np.random.default_rng(seed)
    tokens = family.decisive_tokens(gen, (2, int(gen.integers(10, 18))))
    ref, out = family.reference(tokens), run(family.model, tokens)
    for b in range(2):
        err = rel_err(out[b], ref[b])
        assert err <= REL_TOL, f"batch row {b}: relative error {err:.2e} {family.note(seed)}"


def test_cached_decode(family, seed):
    """Prefill, a multi-token chunk, then single tokens, through the family's own (mlx-lm) cache."""
    gen = np.random.default_rng(seed)
    prefill, chunk, steps = int(gen.integers(3, 8)), int(gen.integers(2, 6)), 8
    tokens = family.decisive_tokens(gen, (1, prefill + chunk + steps))
    ref = family.reference(tokens)
    cache = family.model.make_cache()
    bounds = [0, prefill, prefill + chunk] + list(range(prefill + chunk + 1, tokens.shape[1] + 1))
    for start, end in zip(bounds, bounds[1:]):
        err = rel_err(run(family.model, tokens[:, start:end], cache), ref[:, start:end])
        assert err <= REL_TOL, f"positions {start}..{end - 1}: relative error {err:.2e} {family.note(seed)}"


def decisive_greedy(family, gen, n, model=None):
    """A prompt and transformers' greedy continuation with no router or argmax near-tie on the way."""
    for _ in range(20):
        prompt = family.decisive_tokens(gen, (1, int(gen.integers(4, 9))), model)
        full = prompt
        for _ in range(n):  # full recompute every step: the reference involves no cache
            nxt = family.reference(full, model)[:, -1].argmax(-1)
            full = np.concatenate([full, nxt[:, None]], axis=1)
        logits = family.reference(full[:, :-1], model)[0, prompt.shape[1] - 1:]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        if (top2[:, 1] - top2[:, 0]).min() > ARGMAX_MARGIN and \
                hf_families.routing_margin(model or family.torch_model, torch.from_numpy(full)) > ROUTER_MARGIN:
            return prompt, full[0, prompt.shape[1]:].tolist()
    raise AssertionError(f"no decisive greedy run in 20 prompts {family.note()}")


def test_greedy_continuation(family, seed):
    prompt, expected = decisive_greedy(family, np.random.default_rng(seed), 32)
    got = greedy(family.model, prompt, 32)
    first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    assert got == expected, f"first difference at step {first} {family.note(seed)}"


def test_speculative_greedy_continuation(family, seed):
    """Every expert in the device tier: decode tokens run as speculative tokens (no per-layer sync, mlx-lm's
    caches rewound by family_cache.py) and still continue as transformers does."""
    if family.model.store is None or family.name == "gpt_oss":
        pytest.skip("gpt-oss's experts read through the store alone: no device tier to bet on")
    model = flash_moe.load(family.dst16, cache_experts="all")
    try:
        model.device_cache.preload()
        prompt, expected = decisive_greedy(family, np.random.default_rng(seed), 16)
        got = greedy(model, prompt, 16)
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        totals = model.device_cache.totals()
        assert got == expected, f"first difference at step {first}: {totals} {family.note(seed)}"
        assert totals["speculated"] >= 15 and totals["voided"] == 0, totals
    finally:
        model.close()


def test_other_k_routes_as_the_family_does(family, seed):
    """K override changes the family's own top-k: equal to transformers built with that num_experts_per_tok."""
    k = family.torch_model.config.num_experts_per_tok + 2
    reference = hf_families.with_top_k(family.torch_model, k)
    model = flash_moe.load(family.dst16, experts_per_token=k)
    try:
        assert model.experts_per_token == k
        gen = np.random.default_rng(seed)
        tokens = family.decisive_tokens(gen, (1, 12), reference)
        ref = family.reference(tokens, reference)
        err = rel_err(run(model, tokens), ref)
        assert err <= REL_TOL, f"K={k}: relative error {err:.2e} {family.note(seed)}"
        assert rel_err(run(family.model, tokens), ref) > 1e-3, "the K override changed nothing " + family.note(seed)
        with pytest.raises(ValueError, match="experts_per_token"):
            model.set_experts_per_token(model.config.num_experts + 1)
    finally:
        model.close()


def mlx_lm_resident(family, bits: int | None, group_size: int, resident=None):
    """mlx-lm's own model of the checkpoint, all in memory, its SwitchGLU experts quantized by mlx-lm
    (and the other modules ``resident(path, module)`` names, with the settings it returns)."""
    from mlx_lm.models.switch_layers import SwitchLinear

    from flash_moe.families import model_args

    def predicate(path, module):
        if isinstance(module, SwitchLinear):
            return {"group_size": group_size, "bits": bits} if bits else False
        return resident(path, module) if resident else False

    config = family.model.raw_config
    arch = architecture(config, family.src)
    model = arch.Model(model_args(arch, config, family.src))
    weights = {k: v for f in sorted(family.src.glob("*.safetensors")) for k, v in mx.load(str(f)).items()}
    weights = model.sanitize(weights)
    for k in [k for k, v in weights.items() if k.endswith(".scales") and v.dtype == mx.uint8]:  # gpt-oss's mxfp4
        w = k[: -len("scales")] + "weight"
        weights[w] = mx.dequantize(weights[w], weights.pop(k), group_size=32, bits=4, mode="mxfp4").astype(mx.float32)
    model.load_weights(list(weights.items()))
    nn.quantize(model, class_predicate=predicate)
    mx.eval(model.parameters())
    return model


def test_4bit_matches_mlx_lm_resident(family, seed):
    reference = mlx_lm_resident(family, 4, 64)
    model = flash_moe.load(family.dst4)
    try:
        assert model.store.layout.expert.bits == 4
        gen = np.random.default_rng(seed)
        tokens = family.decisive_tokens(gen, (1, 14))
        ref = np.array(reference(mx.array(tokens)))
        err = rel_err(run(model, tokens), ref)
        assert err <= REL_TOL, f"relative error {err:.2e} vs mlx-lm resident {family.note(seed)}"
        # and its greedy continuation, token for token
        prompt = tokens[:, :6]
        expected, ids = [], mx.array(prompt)
        for _ in range(16):
            nxt = int(mx.argmax(reference(ids)[0, -1]).item())
            expected.append(nxt)
            ids = mx.concatenate([ids, mx.array([[nxt]])], axis=1)
        assert greedy(model, prompt, 16) == expected, family.note(seed)
    finally:
        model.close()


def test_resident_experts_equal_streamed(family, seed):
    """stream=False reads every expert into memory once: the same logits as streaming them."""
    model = flash_moe.load(family.dst4, stream=False)
    streamed = flash_moe.load(family.dst4)
    try:
        assert model.store is None
        tokens = hf_models.random_tokens(np.random.default_rng(seed), family.vocab, (1, 9))
        np.testing.assert_array_equal(run(model, tokens), run(streamed, tokens), err_msg=family.note(seed))
    finally:
        streamed.close()


def test_tiers_equal_streamed(family, seed):
    """A device tier with a host tier behind it (small: evicting) gives the store-only logits, prefill and decode."""
    import os

    if os.environ.get("FLASH_MOE_BACKEND") == "cuda" or not family.model.store:
        pytest.skip("CPU form of the host tier; or no streamed experts")
    plain = flash_moe.load(family.dst4, cache_experts=0)
    tiered = flash_moe.load(family.dst4, cache_experts=0.25, host_cache=0.5)
    try:
        own = tiered.device_cache is None  # gpt-oss's experts read through the store alone
        assert own or tiered.host_cache is not None
        tokens = hf_models.random_tokens(np.random.default_rng(seed), family.vocab, (1, 12))
        c1, c2 = plain.make_cache(), tiered.make_cache()
        for start, end in [(0, 6)] + [(i, i + 1) for i in range(6, 12)]:
            a, b = run(plain, tokens[:, start:end], c1), run(tiered, tokens[:, start:end], c2)
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=family.note(seed))
        if not own:
            t = tiered.tier_totals()
            assert t["device"]["misses"] == t["host"]["hits"] + t["host"]["misses"] > 0, t
    finally:
        plain.close()
        tiered.close()


def test_without_mlx_lm_one_line_error(family, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx_lm", None)
    monkeypatch.setitem(sys.modules, "mlx_lm.utils", None)
    with pytest.raises(CheckpointError) as e:
        flash_moe.load(family.dst16)
    assert EXTRA in str(e.value) and "\n" not in str(e.value) and family.name in str(e.value)


def test_unknown_model_type(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_moe"}))
    (tmp_path / "layout.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no_such_moe.*not a model flash_moe or mlx-lm implements"):
        flash_moe.load(tmp_path)


def test_resident_bits_match_mlx_lm(family, tmp_path, seed):
    """--resident-bits 4: attention, dense and shared-expert matrices at 4 bits, routers at >= 8; equal to
    mlx-lm's resident model quantized (by mlx-lm) with the settings recorded in config.json."""
    import json

    dst = convert(family.src, tmp_path / "q", bits=4, dtype="float32", resident_bits=4, progress=False)
    quant = json.loads((dst / "config.json").read_text())["quantization"]
    assert quant["bits"] == 4 and all(v["bits"] >= 8 for k, v in quant.items() if isinstance(v, dict))
    names = set(mx.load(str(dst / "resident.safetensors")))
    assert any(n.endswith("self_attn.o_proj.scales") for n in names), sorted(names)
    routers = [n for n in names if n.endswith((".gate.weight", ".gate.scales"))]
    assert all(f"{n.rsplit('.', 1)[0]}.scales" not in names or
               quant.get(n.rsplit(".", 1)[0], {}).get("bits", 0) >= 8 for n in routers)

    def predicate(path, module):
        if f"{path}.scales" not in names or not hasattr(module, "to_quantized"):
            return False
        return {"group_size": 64, "bits": 4, **quant.get(path, {})}

    reference = mlx_lm_resident(family, 4, 64, predicate)
    model = flash_moe.load(dst)
    try:
        tokens = family.decisive_tokens(np.random.default_rng(seed), (1, 11))
        err = rel_err(run(model, tokens), np.array(reference(mx.array(tokens))))
        assert err <= REL_TOL, f"relative error {err:.2e} {family.note(seed)}"
    finally:
        model.close()


def test_interrupted_conversion_resumes(family, tmp_path, monkeypatch):
    """A run stopped after its first MoE layer resumes: finished layers are verified and kept, not repacked;
    the result is byte for byte a clean conversion's."""
    import flash_moe.convert_families as cf

    real, calls = cf.pack_experts, []

    def stop_after_one(stacked, layout, path):
        if calls:
            raise KeyboardInterrupt
        calls.append(path.name)
        return real(stacked, layout, path)

    monkeypatch.setattr(cf, "pack_experts", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        convert(family.src, tmp_path / "r", bits=4, dtype="float32", progress=False)
    assert (tmp_path / "r" / "progress.json").exists() and not (tmp_path / "r" / "layout.json").exists()
    repacked = []
    monkeypatch.setattr(cf, "pack_experts", lambda s, l, p: repacked.append(p.name) or real(s, l, p))
    dst = convert(family.src, tmp_path / "r", bits=4, dtype="float32", progress=False)
    assert calls[0] not in repacked and len(repacked) == len(family.model.store.layout.moe_layers) - 1
    for f in sorted((family.dst4 / "experts").iterdir()):
        assert (dst / "experts" / f.name).read_bytes() == f.read_bytes(), f.name
    assert not (dst / "progress.json").exists()
    # The finished folder records its source and settings (as convert does for every model): other settings
    # or another source are refused, overwrite starts over.
    with pytest.raises(CheckpointError, match="other settings"):
        convert(family.src, dst, bits=8, dtype="float32", progress=False)
    other = tmp_path / "copy"
    shutil.copytree(family.src, other)
    with pytest.raises(CheckpointError, match="not of"):
        convert(other, dst, bits=4, dtype="float32", progress=False)
    assert json.loads((dst / "layout.json").read_text())["conversion"]["source"]["path"] == str(family.src.resolve())
    repacked.clear()
    convert(other, dst, bits=4, dtype="float32", progress=False, overwrite=True)
    assert len(repacked) == len(family.model.store.layout.moe_layers)
    assert json.loads((dst / "layout.json").read_text())["conversion"]["source"]["path"] == str(other.resolve())


def test_mlx_quantized_source_repacked_as_is(family, tmp_path, seed):
    """An mlx-lm-quantized checkpoint (experts 4-bit, routers 8-bit by the family's quant_predicate) converts
    without requantizing: expert bytes are the source's, and the streamed model equals mlx-lm's."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import quantize_model, save_config, save_model

    reference = mlx_lm_resident(family, None, 64)  # float; mlx-lm quantizes it below, as mlx_lm.convert does
    reference, qconfig = quantize_model(reference, dict(family.model.raw_config), 64, 4)
    mlx_src = tmp_path / "mlx"
    save_model(mlx_src, reference)
    save_config(qconfig, mlx_src / "config.json")
    with pytest.raises(CheckpointError, match="--bits 4 --group-size 64 --dtype float32"):
        convert(mlx_src, tmp_path / "wrong", bits=4, group_size=32, dtype="float32", progress=False)
    dst = convert(mlx_src, tmp_path / "out", bits=4, group_size=64, dtype="float32", progress=False)
    model = flash_moe.load(dst)
    try:
        layer = model.store.layout.moe_layers[-1]
        switch = next(p for p, m in model.model.named_modules() if isinstance(m, StreamedSwitch) and
                      p.startswith(f"model.layers.{layer}."))
        source = dict(tree_flatten(reference.parameters()))[f"{switch}.down_proj.scales"]
        spec = model.store.layout.expert.tensor("down_proj.scales")
        raw = (dst / model.store.layout.layer_file(layer)).read_bytes()
        stride = model.store.layout.expert.stride
        for e in (0, source.shape[0] - 1):
            got = raw[e * stride + spec.offset : e * stride + spec.offset + spec.nbytes]
            assert got == np.array(source[e]).tobytes(), f"layer {layer} expert {e} was requantized"
        tokens = family.decisive_tokens(np.random.default_rng(seed), (1, 10))
        err = rel_err(run(model, tokens), np.array(reference(mx.array(tokens))))
        assert err <= REL_TOL, f"relative error {err:.2e} vs mlx-lm {family.note(seed)}"
    finally:
        model.close()


def test_phase_timer(family, seed):
    """--timing on a family: attention, routing, expert I/O and compute, the rest of the block, per token."""
    from flash_moe.generation import generate_step
    from flash_moe.timing import PHASES, PhaseTimer

    timer = PhaseTimer(family.model).install()
    try:
        prompt = mx.array(hf_models.random_tokens(np.random.default_rng(seed), family.vocab, (6,)).astype(np.int32))
        n = len(list(generate_step(prompt, family.model, max_tokens=5, timer=timer)))
    finally:
        timer.uninstall()
    s = timer.summary()
    moe = len(family.model.store.layout.moe_layers)
    assert s["tokens"] == n == 5 and set(s["total"]) == set(PHASES)
    assert s["io"]["experts"] == n * family.model.experts_per_token * moe, s["io"]
    assert all(s["total"][p] > 0 for p in ("attention", "routing", "expert_compute")), s["total"]
    assert "decode: 5 tokens" in timer.table()
    assert not any(type(m).__name__.startswith("_Timed") for _, m in family.model.model.named_modules())


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    """A qwen3_moe checkpoint with the demo's tokenizer and chat template, converted by the command line."""
    import shutil
    from importlib.resources import files

    from flash_moe.cli import main

    tmp, seed = tmp_path_factory.mktemp("tokenizer"), derive_seed("family tokenizer")
    src, torch_model = hf_families.build("qwen3_moe", tmp / "hf", seed=seed, vocab_size=4096)
    demo = files("flash_moe") / "demo"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(demo / name, src / name)
    main(["convert", str(src), str(tmp / "out"), "--bits", "16", "--dtype", "float32"])
    return tmp / "out", torch_model, seed


def test_generate_with_tokenizer(with_tokenizer):
    """LoadedModel.generate / stream_generate on a family model: the demo's tokenizer and chat template, text
    equal to transformers' greedy continuation decoded, a chat prompt through the template."""
    from flash_moe.generation import eos_token_ids

    folder, torch_model, seed = with_tokenizer
    model = flash_moe.load(folder)
    try:
        tok = model.tokenizer
        ids = tok.encode("def add(a, b):")
        full = np.array([ids])
        for _ in range(12):
            with torch.no_grad():
                nxt = int(torch_model(input_ids=torch.from_numpy(full)).logits[0, -1].argmax())
            full = np.concatenate([full, [[nxt]]], axis=1)
        expected = full[0, len(ids):].tolist()
        stops = eos_token_ids(model, tok)
        cut = next((i for i, t in enumerate(expected) if t in stops), len(expected))
        text = model.generate("def add(a, b):", max_tokens=12)
        assert text == tok.decode(expected[:cut]), seed_note(seed)
        assert text.finish_reason == ("stop" if cut < len(expected) else "length"), seed_note(seed)
        streamed = "".join(r.text for r in model.stream_generate("def add(a, b):", max_tokens=12))
        assert streamed == text
        reply = model.generate([{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.finish_reason in ("length", "stop")
    finally:
        model.close()


def test_cli_verify_and_generate_with_timing(with_tokenizer, capsys):
    from flash_moe.cli import main

    folder = with_tokenizer[0]
    main(["verify", str(folder)])
    assert "every expert matches its checksum" in capsys.readouterr().out
    main(["generate", "--model", str(folder), "--prompt", "def", "--raw", "--max-tokens", "4", "--k", "3", "--timing"])
    out = "".join(capsys.readouterr())
    assert "expert reads/token: 6.0 experts" in out and "ms/token" in out, out  # K=3 over 2 MoE layers


def test_unconverted_checkpoint_says_convert(family):
    with pytest.raises(CheckpointError, match=f"{family.name}.*runs through mlx-lm.*flash-moe convert"):
        flash_moe.load(family.src)


INTERMEDIATE = {"mixtral": "intermediate_size", "gpt_oss": "intermediate_size", "olmoe": "intermediate_size"}


@pytest.mark.parametrize("edit", ["intermediate", "missing hidden_size"])
def test_config_that_disagrees_is_named(family, tmp_path, edit):
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(family.dst16, folder)
    config = json.loads((folder / "config.json").read_text())
    if edit == "intermediate":
        config[INTERMEDIATE.get(family.name, "moe_intermediate_size")] = 128
        match = r"layout\.json disagrees with config\.json at model\.layers\.\d+\.\w+\.(switch_mlp|experts)"
    else:
        del config["hidden_size"]  # qwen3_moe and mixtral need it; DeepSeek/GLM's default disagrees with the experts
        match = "lacks 'hidden_size'" if family.name == "qwen3_moe" else "hidden_size|disagrees|shape"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match) as e:
        flash_moe.load(folder)
    assert "\n" not in str(e.value)


def test_fewer_slots_than_experts(family, seed):
    """A prompt needing more distinct experts than the store has slots reads them a slot set at a time:
    the same logits. gpt-oss's experts run on MLX ops (OwnFormExperts), the others on StreamingExperts."""
    from flash_moe.family_experts import OwnFormExperts
    from flash_moe.streaming import StreamingExperts

    kind = OwnFormExperts if family.name == "gpt_oss" else StreamingExperts
    switches = [m for _, m in family.model.model.named_modules() if isinstance(m, StreamedSwitch)]
    assert switches and all(type(m.experts) is kind for m in switches)
    model = flash_moe.load(family.dst16, slots=2)
    try:
        tokens = family.decisive_tokens(np.random.default_rng(seed), (1, 16))
        a, b = run(model, tokens), run(family.model, tokens)
        assert model.stats.snapshot().totals()["experts"] > 2 * len(switches)  # more than one slot set a layer
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max(), err_msg=family.note(seed))
    finally:
        model.close()


def test_family_code_failures_are_one_line(family, tmp_path, monkeypatch):
    """mlx-lm's constructor or sanitize failing on what it is given: a CheckpointError naming the file."""
    import json
    import shutil

    src = tmp_path / "hf"
    shutil.copytree(family.src, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_attention_heads": 0, "num_key_value_heads": 0}))
    with pytest.raises(CheckpointError, match=r"config\.json: mlx-lm's \w+ cannot be built from it") as e:
        convert(src, tmp_path / "a", progress=False)
    assert "\n" not in str(e.value)
    (src / "config.json").write_text(json.dumps(config))
    model_class = type(build(architecture(config, src), config, src))

    def sanitize(self, weights):
        raise KeyError("model.layers.9.mlp.experts.0.up_proj.weight")

    monkeypatch.setattr(model_class, "sanitize", sanitize)
    with pytest.raises(CheckpointError, match="sanitize fails on .* cannot be converted layer by layer"):
        convert(src, tmp_path / "b", progress=False)


def test_memory_is_one_layer_converting_and_slots_streaming(tmp_path, seed):
    """Peak MLX memory while converting stays about one layer's experts (+ the resident weights), whatever
    the layer count: sanitize runs on one layer's tensors, and one stacked projection is evaluated at a time.
    Streaming, it stays the resident weights + the slot buffers, far below all the experts."""
    shape = dict(num_hidden_layers=6, mlp_only_layers=[], num_experts=16, moe_intermediate_size=256,
                 hidden_size=128, head_dim=32)
    src, _ = hf_families.build("qwen3_moe", tmp_path / "hf", seed=seed, **shape)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()  # other tests' models may still hold memory
    dst = convert(src, tmp_path / "out", bits=4, dtype="float32", progress=False)
    peak = mx.get_peak_memory() - before
    layer = 16 * 3 * 128 * 256 * 4  # one layer's experts in float32
    resident = (dst / "resident.safetensors").stat().st_size
    assert peak <= 1.5 * layer + resident, (peak, layer, resident)

    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    model = flash_moe.load(dst, slots=4)
    try:
        tokens = hf_models.random_tokens(np.random.default_rng(seed), 120, (1, 24))
        for _ in range(3):
            run(model, tokens)
        e = model.store.layout
        experts = len(e.moe_layers) * e.num_experts * e.expert.expert_bytes
        slots = model.store.buffers.nbytes  # the fixed budget: slot sets (each 2 MB-aligned)
        peak = mx.get_peak_memory() - before
        assert model.stats.snapshot().totals()["experts"] > 16 * 6  # every expert read, a slot set at a time
        assert peak <= resident + slots + experts / 8, (peak, resident, slots, experts)
    finally:
        model.close()


def test_deepseek_fp8_release_dequantized_by_sanitize(tmp_path, seed):
    """DeepSeek-V3 / Kimi-K2 ship float8 matrices with block scales: mlx-lm's sanitize dequantizes them layer
    by layer; streamed logits equal transformers on the dequantized weights."""
    name = "deepseek_v3"
    src, torch_model = hf_families.build(name, tmp_path / "hf", seed=seed)
    hf_families.to_fp8(torch_model, src)
    model = flash_moe.load(convert(src, tmp_path / "out", bits=16, dtype="float32", progress=False))
    try:
        gen = np.random.default_rng(seed)
        tokens = next(t for t in (hf_models.random_tokens(gen, torch_model.config.vocab_size, (1, 12)) for _ in range(20))
                      if hf_families.routing_margin(torch_model, torch.from_numpy(t)) > ROUTER_MARGIN)
        assert any(v.dtype == mx.uint8 for v in mx.load(str(src / "model.safetensors")).values())
        with torch.no_grad():
            ref = torch_model(input_ids=torch.from_numpy(tokens)).logits.numpy()
        err = rel_err(run(model, tokens), ref)
        assert err <= REL_TOL, f"relative error {err:.2e} " + seed_note(seed)
    finally:
        model.close()


def test_undequantized_float8_refused(tmp_path, seed, monkeypatch):
    """A float8 release whose family's sanitize leaves the bytes as they are (GLM-4.5-FP8) must not be read as
    numbers: a named error."""
    from mlx_lm.models import deepseek_v3

    src, torch_model = hf_families.build("deepseek_v3", tmp_path / "hf", seed=seed)
    hf_families.to_fp8(torch_model, src)
    monkeypatch.setattr(deepseek_v3.Model, "sanitize", lambda self, weights: weights)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.[\w.]+' is mlx\.core\.uint8 after mlx-lm's sanitize"):
        convert(src, tmp_path / "out", bits=4, progress=False)


def test_settings_default_to_the_source(family, tmp_path):
    """convert without bits / group size / dtype: an MLX-quantized source's own (repacked, not refused),
    else 4 bits, group 64, bfloat16; other settings are refused in a finished destination, overwrite starts
    it over."""
    from flash_moe.layout import ModelLayout
    from mlx_lm.utils import quantize_model, save_config, save_model

    reference, qconfig = quantize_model(mlx_lm_resident(family, None, 64), dict(family.model.raw_config), 32, 8)
    save_model(tmp_path / "mlx", reference)
    save_config(qconfig, tmp_path / "mlx" / "config.json")
    dst = convert(tmp_path / "mlx", tmp_path / "a", progress=False)
    e = ModelLayout.read(dst).expert
    assert (e.bits, e.group_size, e.dtype) == (8, 32, "float32")
    dst = convert(family.src, tmp_path / "b", progress=False)
    e = ModelLayout.read(dst).expert
    assert (e.bits, e.group_size, e.dtype) == (4, 64, "bfloat16")
    with pytest.raises(CheckpointError, match="other settings"):
        convert(family.src, dst, bits=8, progress=False)
    convert(family.src, dst, bits=8, progress=False, overwrite=True)
    assert ModelLayout.read(dst).expert.bits == 8


def test_prompt_cache_across_generations(family, seed):
    """generate_step with prompt_cache= over the family's own (mlx-lm) caches: a prompt that extends the
    cached one, one that diverges inside it and a shorter one each give a fresh run's tokens and logprobs,
    reusing what the caches allow (KV trimmed back; gpt-oss's sliding-window cache, once past its window of
    8, cannot be trimmed and starts over)."""
    from flash_moe.generation import generate_step

    def steps(ids, cache=None):
        out = list(generate_step(mx.array(np.array(ids, np.int32)), family.model, max_tokens=4, prompt_cache=cache))
        return [t for t, _ in out], np.stack([np.array(lp) for _, lp in out])

    def check(ids, cache, reused):
        assert cache.reusable(ids) == reused, f"reusable {cache.reusable(ids)} != {reused} {family.note(seed)}"
        (got, lp), (want, ref) = steps(ids, cache), steps(ids)
        assert got == want, f"tokens {got} != fresh {want} {family.note(seed)}"
        err = rel_err(lp, ref)
        assert err <= REL_TOL, f"logprobs: relative error {err:.2e} vs a fresh run {family.note(seed)}"
        return got

    gen = np.random.default_rng(seed)
    first = hf_models.random_tokens(gen, family.vocab, (12,)).tolist()
    cache = family.model.make_prompt_cache()
    out = check(first, cache, 0)
    assert cache.tokens == first + out[:-1]
    longer = cache.tokens + hf_models.random_tokens(gen, family.vocab, (3,)).tolist()
    check(longer, cache, len(cache.tokens))  # everything cached is reused, trimmable or not
    rotated = family.name == "gpt_oss"  # its sliding layers hold the last 8 tokens of 20 now
    diverged = first[:6] + [(first[6] + 1) % family.vocab] + first[7:]
    check(diverged, cache, 0 if rotated else 6)
    check(first[:5], cache, 0 if rotated else 4)  # at least the last prompt token is processed


def test_family_surface_checks(family, tmp_path):
    """Token ids checked by model(tokens) (forward skips it, as generation uses it); prompt cache files and
    continuous batching, made for flash_moe's own caches, refuse a family model in one line."""
    from flash_moe.batch import Batch
    from flash_moe.prompt_cache import load_prompt_cache, save_prompt_cache

    with pytest.raises(ValueError, match="out of range"):
        family.model(mx.array([[1, family.vocab]]))
    assert family.model.forward(mx.array([[1, 2]])).shape == (1, 2, family.vocab)
    cache = family.model.make_prompt_cache()
    with pytest.raises(ValueError, match="prompt cache files are for flash_moe's own models"):
        save_prompt_cache(tmp_path / "c.safetensors", cache, family.model)
    with pytest.raises(ValueError, match="prompt cache files are for flash_moe's own models"):
        load_prompt_cache(tmp_path / "c.safetensors", family.model)
    with pytest.raises(ValueError, match="continuous batching runs flash_moe's own models"):
        Batch(family.model)


def test_verify_reaches_the_store(family, tmp_path):
    """load(verify=) checks a family's experts as any model's: a damaged expert is named on first read."""
    from flash_moe.layout import ModelLayout

    folder = tmp_path / "m"
    shutil.copytree(family.dst4, folder)
    layout = ModelLayout.read(folder)
    layer = layout.moe_layers[0]
    path = folder / layout.layer_file(layer)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF  # expert 0 of the first MoE layer: sampled by "sample" ((e + l) % 16 == 0 needs l % 16 == 0)
    path.write_bytes(bytes(data))
    model = flash_moe.load(folder, verify="full")
    try:
        with pytest.raises(CheckpointError, match=f"layer {layer}.*expert 0"):  # 64 tokens reach every expert
            model(mx.array(np.arange(64, dtype=np.int32)[None] % family.vocab))
    finally:
        model.close()
    with pytest.raises(CheckpointError, match=f"layer {layer}"):
        flash_moe.load(folder, stream=False, verify="full")


class _TwoRanks:
    """A stand-in for an mx.distributed group of two ranks: the refusal comes before any collective."""

    def size(self) -> int:
        return 2

    def rank(self) -> int:
        return 0


def test_expert_parallel_refused_for_families(family):
    """Expert-parallel runs split flash_moe's own MoE block; a family model in a group says so in one line."""
    with pytest.raises(ValueError, match=r"expert-parallel runs support Qwen3\.5-MoE and Qwen3-Next only.*group=None"):
        flash_moe.load(family.dst16, group=_TwoRanks())
