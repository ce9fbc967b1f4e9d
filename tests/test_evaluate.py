"""``flash_moe.evaluate`` / ``flash-moe eval`` (issue 15): windows, perplexity, KL and top-1 against direct
computations on a tiny random model, the demo model's K curve, data sources and the CLI."""

from __future__ import annotations

import json
import math
import shutil
import sys

import mlx.core as mx
import numpy as np
import pytest

from conftest import seed_note

from flash_moe import evaluate, load
from flash_moe.cli import main
from flash_moe.eval import token_nlls, windows
from flash_moe.eval.data import SAMPLE, read_text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer random converted model (vocab 200) and its config's K (4)."""
    from conftest import derive_seed
    from flash_moe.synthetic import qwen35_397b_config, write_synthetic

    config = qwen35_397b_config(num_layers=2, vocab_size=200)
    config.update(hidden_size=64, moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=8,
                  num_experts_per_tok=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                  layer_types=["linear_attention", "full_attention"])
    return write_synthetic(tmp_path_factory.mktemp("tiny") / "m", config, bits=4, seed=derive_seed("eval-tiny"),
                           progress=False)


def random_ids(seed: int, n: int, vocab: int = 200) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def logprobs(model, ids) -> np.ndarray:
    """Float64 log-softmax of the model's logits for a whole sequence (one forward, fresh cache)."""
    logits = np.array(model(mx.array(ids, mx.int32)[None], model.make_cache())[0].astype(mx.float32), np.float64)
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)


@pytest.mark.parametrize("n,context,stride", [(2, 2, 1), (10, 4, 1), (10, 4, 3), (37, 8, 5), (8, 100, 50), (9, 3, 2)])
def test_windows_score_each_token_once_with_enough_context(n, context, stride):
    scored = []
    for begin, end, first in windows(n, context, stride):
        assert end - begin <= context and begin < first < end <= n
        assert first == 1 or first - begin >= context - stride  # every later window keeps context - stride tokens
        scored += range(first, end)
    assert scored == list(range(1, n))


@pytest.mark.parametrize("context,stride", [(1, 1), (8, 8), (8, 0), (8, 9)])
def test_windows_reject_bad_context_or_stride(context, stride):
    with pytest.raises(ValueError, match="--context|--stride"):
        windows(20, context, stride)


def test_perplexity_equals_direct_computation(tiny, seed):
    """exp(mean NLL), each token scored once, given the tokens of its window before it: computed here token by
    token with the window start derived in closed form, one forward per token."""
    model = load(tiny)
    n, context, stride = 29, 10, 4
    ids = random_ids(seed, n)
    direct = []
    for j in range(1, n):
        i = max(0, math.ceil((j + 1 - context) / stride))  # the first window whose end passes j
        begin = i * stride
        direct.append(-logprobs(model, ids[begin:j])[-1, ids[j]])
    direct = np.array(direct)
    nlls = token_nlls(model, ids, context, stride)
    np.testing.assert_allclose(nlls, direct, rtol=0, atol=2e-4, err_msg=seed_note(seed))
    row = evaluate([model], ids, context=context, stride=stride, progress=False, decode_tokens=0)[0]
    assert row.tokens == n - 1
    assert row.perplexity == pytest.approx(math.exp(direct.mean()), rel=1e-4), seed_note(seed)
    model.close()


def test_model_against_itself_has_zero_kl_and_full_agreement(tiny, tmp_path, seed):
    """A second copy of the folder, loaded and run on its own, is compared with the first token by token."""
    copy = shutil.copytree(tiny, tmp_path / "copy")
    rows = evaluate([tiny, copy], random_ids(seed, 40), context=16, stride=8, progress=False, decode_tokens=2)
    ref, other = rows
    assert ref.reference and not other.reference and other.model == str(copy)
    assert other.kl == pytest.approx(0.0, abs=1e-6) and other.top1 == 1.0, seed_note(seed)
    assert other.perplexity == pytest.approx(ref.perplexity, rel=1e-6)
    assert ref.bits == other.bits == 4 and ref.k == other.k == 4


def test_kl_and_top1_equal_direct_computation(tiny, seed):
    """K=1 against the reference K=4, one window: KL(p_ref || p_1) and argmax agreement from full forwards."""
    ids = random_ids(seed, 24)
    model = load(tiny)
    ref = logprobs(model, ids[:-1])
    model.set_experts_per_token(1)
    cand = logprobs(model, ids[:-1])
    model.set_experts_per_token(4)
    kl = (np.exp(ref) * (ref - cand)).sum(-1).mean()
    top1 = (ref.argmax(-1) == cand.argmax(-1)).mean()
    rows = evaluate([model], ids, k=[1, 4], context=64, stride=32, progress=False, decode_tokens=0)
    assert [(r.k, r.reference) for r in rows] == [(4, True), (1, False)]  # K=4 is the reference, run once
    assert kl > 1e-3, seed_note(seed)
    assert rows[1].kl == pytest.approx(kl, rel=1e-3, abs=1e-6), seed_note(seed)
    assert rows[1].top1 == pytest.approx(top1), seed_note(seed)
    assert model.experts_per_token == 4  # restored
    model.close()


def test_bytes_per_token_is_k_experts_per_moe_layer(tiny, seed):
    """Decoding reads the K routed experts of each MoE layer per token (no device cache on the CPU)."""
    from flash_moe.layout import ModelLayout

    layout = ModelLayout.read(tiny)
    rows = evaluate([tiny], random_ids(seed, 30), k=[1, 3], reference=f"{tiny}@2", context=16, stride=8,
                    progress=False, decode_tokens=5, load_options={"cache_experts": 0})
    assert [r.k for r in rows] == [2, 1, 3]
    for r in rows:
        assert r.bytes_per_token == r.k * len(layout.moe_layers) * layout.expert.expert_bytes
        assert r.tok_per_s > 0


def test_demo_k1_is_worse_than_k4(demo_folder):
    """The demo model was trained at K=4 of 16: one expert per token costs perplexity (issue 15's curve)."""
    rows = evaluate([demo_folder], k=[1, 4], max_tokens=320, context=192, stride=128, progress=False, decode_tokens=0)
    by_k = {r.k: r for r in rows}
    assert by_k[1].perplexity > 1.05 * by_k[4].perplexity
    assert by_k[1].kl > 0.05 and by_k[1].top1 < 0.9
    assert by_k[4].tokens == 319


def test_read_text_sources(tmp_path, monkeypatch):
    assert "def " in read_text(None) and read_text(None) == SAMPLE.read_text()
    (tmp_path / "a.txt").write_text("plain text\n")
    assert read_text(tmp_path / "a.txt") == "plain text\n"
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert read_text(str(tmp_path / "a.jsonl")) == "one\n\ntwo"
    (tmp_path / "bad.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object"):
        read_text(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=r"--data .*missing.txt: no such file"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"--data .*folder"):
        read_text(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ValueError, match=r"hub:wikitext2: needs the datasets package"):
        read_text("hub:wikitext2")


def test_hub_data_unreachable_is_one_line(tmp_path):
    """In a fresh process (the hub libraries read their offline switches at import)."""
    import os
    import subprocess

    pytest.importorskip("datasets")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    code = "from flash_moe.eval.data import read_text; read_text('hub:no-such/dataset-xyz')"
    err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stderr
    assert "ValueError: --data hub:no-such/dataset-xyz: cannot load the dataset" in err


def test_cli_eval_table_json_plot(demo_folder, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": SAMPLE.read_text()[:1500]}) + "\n")
    out, png = tmp_path / "rows.json", tmp_path / "p.png"
    main(["eval", "--model", str(demo_folder), "--data", str(data), "--k", "2,4", "--context", "64",
          "--stride", "48", "--max-tokens", "100", "--decode-tokens", "3", "--json", str(out), "--plot", str(png)])
    table = capsys.readouterr().out
    assert "perplexity" in table and "KL" in table and "top-1" in table
    rows = json.loads(out.read_text())
    assert [(r["k"], r["bits"], r["tokens"]) for r in rows] == [(4, 4, 99), (2, 4, 99)]
    for r in rows:
        assert {"model", "bits", "k", "perplexity", "kl", "top1", "bytes_per_token", "tok_per_s", "tokens"} <= set(r)
    assert rows[0]["kl"] == 0 and rows[1]["kl"] > 0 and rows[1]["bytes_per_token"] < rows[0]["bytes_per_token"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,message", [
    (["--k", "0,2"], "K values must be positive"),
    (["--k", "a"], "expected K values"),
])
def test_cli_eval_rejects_bad_k(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--model", "x"] + argv)
    assert message in capsys.readouterr().err


def test_cli_eval_errors_name_the_flag(demo_folder, capsys):
    with pytest.raises(SystemExit, match="--stride must be in 1..31"):
        main(["eval", "--model", str(demo_folder), "--context", "32", "--stride", "32", "--max-tokens", "40"])
    with pytest.raises(SystemExit, match="--reference .*expected MODEL@K"):
        main(["eval", "--model", str(demo_folder), "--reference", f"{demo_folder}@x"])
    with pytest.raises(SystemExit, match="--k 17: .* has 16 experts"):
        main(["eval", "--model", str(demo_folder), "--k", "17", "--max-tokens", "40"])


def test_plot_without_matplotlib_is_one_line(tmp_path, monkeypatch):
    from flash_moe.eval import Row
    from flash_moe.eval.report import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ValueError, match=r"--plot needs matplotlib \(pip install 'flash-moe\[eval\]'\)"):
        plot([Row("m", 4, 4, 2.0, 0.0, 1.0, 1e3, 10.0, 9)], tmp_path / "p.png")
