"""Build the assets of `flash-moe demo`: a tiny Qwen3.5-MoE trained briefly on Python's own stdlib.

The demo must run offline in seconds, so it ships a ~6 MB checkpoint in the Hugging Face layout
(flash_moe/demo/). Random weights would print noise and route uniformly; a model trained for a few
minutes on the running interpreter's standard library writes Python-looking code, and its router
has the skewed expert popularity of real MoE models, which is what expert streaming exploits.

Steps: pick a deterministic subset of the stdlib *.py files (sorted, every other file, a few MB;
the rest is held out for validation), train a byte-level BPE like Qwen's on it, add ChatML
examples made from the stdlib's own functions (so chat prompts answer with code), train a tiny
`qwen3_5_moe_text` model (torch, CPU) and save it with save_pretrained in bfloat16.

Tool calls: `--tool-steps N` then trains N more steps, each on --tool-rows synthetic dialogues
(examples/tool_dialogues.py: a request, one tool call, the tool's result, a short answer; rendered by the
demo's own chat template) and --tool-batch source windows. The dialogues' loss is on the assistant's turns
only, each dialogue is seen whole from its first token, and the dialogues of a step share one tools prompt,
which runs once without gradients. `--init FOLDER` starts from a saved demo (weights and tokenizer) and runs
only the tool steps. The shipped demo is the stdlib model (first command, ~15 min on one shared core)
fine-tuned on tool dialogues in three runs (~10 min each; flash_moe/demo/README.md lists them):
    .venv/bin/python examples/train_demo_model.py --out /tmp/demo-stdlib
    .venv/bin/python examples/train_demo_model.py --init /tmp/demo-stdlib --out /tmp/demo-tools1 --tool-steps 600 \
        --tool-batch 1 --tool-lr 1.5e-3 --dialogue-weight 2
    (then --init /tmp/demo-tools1 --tool-steps 600 --tool-batch 2 --tool-lr 1e-3 --seed 1, and
     --init of that --tool-steps 400 --tool-lr 7e-4 --seed 2, both --dialogue-weight 2)
The request-to-tool mapping appears late: after 300 tool steps the model writes the call format but names
the same tool whatever the request; after 600 it picks the tool from the request (4-bit validity 0.75 on 60
fresh requests); after 1,600 all of 100 fresh requests get a valid call (0.69 exact).
The result depends on the Python version whose stdlib is read (the shipped assets read CPython
3.11.7's; pass --stdlib to read another copy).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import re
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tool_dialogues  # noqa: E402  (next to this script)

# Qwen keeps <|...|> tokens "special" (dropped by skip_special_tokens) but leaves the
# think/tool tags visible, because parsers read them from the decoded text.
CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAG_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

# Qwen3.5's pre-tokenizer split (transformers' tokenization_qwen3_5.PRETOKENIZE_REGEX): words,
# single digits, punctuation runs, newlines, spaces. AutoTokenizer rebuilds the tokenizer from the
# vocab with this regex and NFC (it picks Qwen3_5Tokenizer from config.json's model_type), so the
# tokenizer trained here uses the same pipeline, and both give the same ids.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings", "pydoc_data", "lib2to3"}

# Qwen3.5's text-only chat template: ChatML, tools as JSON in the system prompt, XML tool calls,
# tool results as <tool_response> blocks in a user turn, and the <think> block rules.
CHAT_TEMPLATE = r"""{%- macro render_content(content) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for item in content %}
            {%- if item.type == 'text' or 'text' in item %}
                {{- item.text }}
            {%- else %}
                {{- raise_exception('This model reads text only, got a content item of type ' ~ item.type) }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is none or content is undefined %}
        {{- '' }}
    {%- else %}
        {{- raise_exception('Unexpected content type.') }}
    {%- endif %}
{%- endmacro %}
{%- if not messages %}
    {{- raise_exception('No messages provided.') }}
{%- endif %}
{%- if tools and tools is iterable and tools is not mapping %}
    {{- '<|im_start|>system\n' }}
    {{- "# Tools\n\nYou have access to the following functions:\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>" }}
    {{- '\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after\n- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT>' }}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content)|trim %}
        {%- if content %}
            {{- '\n\n' + content }}
        {%- endif %}
    {%- endif %}
    {{- '<|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + render_content(messages[0].content)|trim + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == 'user' %}
        {%- set content = render_content(message.content)|trim %}
        {%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = render_content(message.content)|trim %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}
            {{- raise_exception('System message must be at the beginning.') }}
        {%- endif %}
    {%- elif message.role == 'user' %}
        {{- '<|im_start|>user\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- set reasoning_content = reasoning_content|trim %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning_content + '\n</think>\n\n' + content }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {%- if message.tool_calls and message.tool_calls is iterable and message.tool_calls is not mapping %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {%- if loop.first and not content %}
                    {{- '<tool_call>\n<function=' + tool_call.name + '>\n' }}
                {%- elif loop.first %}
                    {{- '\n\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                {%- else %}
                    {{- '\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                {%- endif %}
                {%- if tool_call.arguments is string %}
                    {{- raise_exception('tool_calls[].function.arguments must be a mapping: json.loads the OpenAI string first') }}
                {%- endif %}
                {%- if tool_call.arguments is defined %}
                    {%- for args_name, args_value in tool_call.arguments|items %}
                        {{- '<parameter=' + args_name + '>\n' }}
                        {{- args_value if args_value is string else args_value | tojson }}
                        {{- '\n</parameter>\n' }}
                    {%- endfor %}
                {%- endif %}
                {{- '</function>\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or loop.previtem.role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unexpected message role: ' ~ message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- else %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}
"""


def stdlib_files(root: Path, max_file_bytes: int = 120_000) -> list[Path]:
    """The stdlib's own modules, sorted; no tests, codec tables, vendored packages or huge files."""
    return [
        p
        for p in sorted(root.rglob("*.py"))
        if not set(p.relative_to(root).parts[:-1]) & SKIPPED_DIRS and p.stat().st_size <= max_file_bytes
    ]


def stdlib_split(root: Path, max_bytes: int) -> tuple[list[Path], list[Path]]:
    """Even positions train (up to max_bytes, spread over the whole stdlib), odd ones are held out."""
    files = stdlib_files(root)
    train, held_out, total = [], files[1::2], 0
    for p in files[::2]:
        if total + p.stat().st_size > max_bytes:
            break
        train.append(p)
        total += p.stat().st_size
    return train, held_out


def read_sources(paths: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE like Qwen's; the nine special tokens take the last ids, as in Qwen."""
    n_special = len(CHATML_TOKENS) + len(TAG_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_special,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHATML_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}: too little text?")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def chat_examples(root: Path, paths: list[Path], texts: list[str], tokenizer, max_chars: int, seed: int) -> list[str]:
    """ChatML turns asking for a stdlib function or class and answering with its source."""
    candidates = []
    for path, text in zip(paths, texts):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            source = ast.get_source_segment(text, node)
            if source is None or not 80 <= len(source) <= 1500:
                continue
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            ask = f"Write the {kind} `{node.name}` of the Python module `{module}`."
            doc = ast.get_docstring(node)
            if doc:
                ask += " " + doc.strip().splitlines()[0]
            candidates.append((ask, source))
    rng = random.Random(seed)
    rng.shuffle(candidates)
    examples, total = [], 0
    for i, (ask, source) in enumerate(candidates):
        messages = [{"role": "user", "content": ask}, {"role": "assistant", "content": source}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You are a helpful Python programmer."})
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        if total + len(text) > max_chars:
            break
        examples.append(text)
        total += len(text)
    return examples


def split_thinking(text: str) -> tuple[str, ...]:
    """The text cut after each "<think>\n": a chat with thinking on ends its prompt there, so the model must
    learn to go on from a lone "\n" token, where the whole rendered text would merge it into "\n\n"."""
    pieces = text.split("<think>\n")
    return tuple(p + "<think>\n" for p in pieces[:-1]) + (pieces[-1],)


def token_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """All documents as one id stream, each followed by <|endoftext|>."""
    eod = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = []
    for enc in tokenizer.backend_tokenizer.encode_batch(documents, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eod)
    return torch.tensor(ids, dtype=torch.long)


ASSISTANT = re.compile(r"(?<=<\|im_start\|>assistant\n).*?<\|im_end\|>", re.S)


def dialogue_tokens(tokenizer, text: str, thinking: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One rendered dialogue as (ids, labels): labels are the ids on the assistant's turns (from after
    "<|im_start|>assistant\n" to its <|im_end|>) and -100 elsewhere, so the loss is on what the model says,
    not on the long tools prompt or the tool's results. Cut points are at special tokens, so encoding the
    pieces apart gives the ids of the whole text. ``thinking``: encoded as a prompt with thinking on ends
    (after "<think>\n", see split_thinking), else as one with it off (after "</think>\n\n")."""
    pieces, at = [], 0
    for m in ASSISTANT.finditer(text):
        pieces.append((text[at : m.start()], False))
        said = split_thinking(m.group()) if thinking else (m.group(),)
        pieces += [(piece, True) for piece in said]
        at = m.end()
    pieces.append((text[at:], False))
    ids, labels = [], []
    for (piece, supervised), enc in zip(pieces, tokenizer.backend_tokenizer.encode_batch(
            [p for p, _ in pieces], add_special_tokens=False)):
        ids += enc.ids
        labels += enc.ids if supervised else [-100] * len(enc.ids)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def demo_config(tokenizer) -> Qwen3_5MoeTextConfig:
    """Qwen3.5's shapes scaled down; every matrix dim is a multiple of 64 (4-bit group-64)."""
    return Qwen3_5MoeTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_conv_kernel_dim=4,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e6,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],  # sums to head_dim * 0.25 / 2 rotary frequencies
            "mrope_interleaved": True,
        },
        tie_word_embeddings=False,
        router_aux_loss_coef=0.001,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
    )


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def row_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (not -100) positions."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100)


@torch.no_grad()
def eval_loss(model, windows: torch.Tensor, labels: torch.Tensor | None = None) -> float:
    model.eval()
    loss = row_loss(model(input_ids=windows).logits, windows if labels is None else labels).item()
    model.train()
    return loss


def pad_rows(pairs, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) pairs right-padded to the longest (pad id, label -100): causal, so padding changes nothing."""
    n = max(len(i) for i, _ in pairs)
    ids = torch.full((len(pairs), n), pad, dtype=torch.long)
    labels = torch.full((len(pairs), n), -100, dtype=torch.long)
    for row, (i, l) in enumerate(pairs):
        ids[row, : len(i)], labels[row, : len(l)] = i, l
    return ids, labels


@torch.no_grad()
def expert_usage(model, ids: torch.Tensor) -> torch.Tensor:
    """Top-k selections per layer and expert, shape (layers, experts), as HF's router picks them."""
    cfg = model.config
    logits = model(input_ids=ids, output_router_logits=True).router_logits
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_experts, dtype=torch.long)
    for layer, layer_logits in enumerate(logits):
        top = layer_logits.float().topk(cfg.num_experts_per_tok, dim=-1).indices
        counts[layer] = torch.bincount(top.flatten(), minlength=cfg.num_experts)
    return counts


def top_share(counts: torch.Tensor, fraction: float = 0.2) -> torch.Tensor:
    """Share of all selections taken by the most popular `fraction` of experts, per layer."""
    k = max(1, int(counts.shape[-1] * fraction))
    return counts.sort(dim=-1, descending=True).values[:, :k].sum(-1) / counts.sum(-1)


@torch.no_grad()
def greedy_samples(model, tokenizer, max_new_tokens: int = 60) -> dict[str, str]:
    """Greedy continuations of two raw prompts and one chat prompt, decoded."""
    chat = [{"role": "user", "content": "Write the function `quote` of the Python module `shlex`."}]
    prompts = ["def ", "import os\n",
               tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, enable_thinking=False)]
    samples = {}
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        samples[prompt] = tokenizer.decode(out[0, ids.shape[1]:])
    return samples


def shared_prefix_batch(tokenizer, texts: list[str], step: int):
    """Dialogues that share one system prompt as (prefix ids (1, P), ids (B, S), labels (B, S)): the prompt,
    then each dialogue from its first user turn on, right-padded. Rows alternate thinking on and off."""
    cut = texts[0].index("<|im_start|>user")
    if any(t[:cut] != texts[0][:cut] for t in texts):
        raise ValueError("the dialogues of a batch must share their system prompt")
    prefix = tokenizer.backend_tokenizer.encode(texts[0][:cut], add_special_tokens=False).ids
    rows = [dialogue_tokens(tokenizer, t[cut:], thinking=(step + i) % 2 == 1) for i, t in enumerate(texts)]
    return (torch.tensor([prefix], dtype=torch.long), *pad_rows(rows, tokenizer.pad_token_id))


def dialogue_forward(model, prefix: torch.Tensor, ids: torch.Tensor, router_logits: bool):
    """The shared system prompt runs once, without gradients (it holds no labels, and it is most of a chat's
    tokens); its cache, repeated per row, feeds the rows, which train. About 4x fewer tokens through backward."""
    with torch.no_grad():
        cache = model(input_ids=prefix, use_cache=True).past_key_values
    cache.reorder_cache(torch.zeros(len(ids), dtype=torch.long))
    for layer in cache.layers:  # the rows read the prompt's recurrent state; writing theirs back in place would
        if hasattr(layer, "recurrent_states"):  # change a tensor autograd keeps, and nothing reads it after
            layer.update_recurrent_state = lambda states, *args, **kwargs: states
    return model(input_ids=ids, past_key_values=cache, use_cache=True, output_router_logits=router_logits)


def train(model, stream, val_windows, args, dialogue_batches=None, val_dialogues=None) -> list[tuple]:
    """Each step: --batch random windows of the source stream (loss on every token) and, with tool dialogues,
    --tool-rows whole dialogues that share one tools prompt (loss on the assistant's turns only: the call and
    the answer). A chat starts with the long tools prompt, so every dialogue is seen from its first token, as
    inference sees it. The two losses are means per row kind, added (--dialogue-weight), so a dialogue's few
    labelled tokens are not drowned by the source rows' many."""
    gen = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    cfg, history, start = model.config, [], time.time()
    router_logits = args.aux_coef > 0
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        losses, aux = {}, 0.0
        if dialogue_batches is not None:
            prefix, ids, labels = next(dialogue_batches)
            out = dialogue_forward(model, prefix, ids, router_logits)
            losses["dialogue"] = row_loss(out.logits, labels)
            aux = aux + (out.aux_loss if router_logits else 0.0)
        if args.batch:
            starts = torch.randint(0, len(stream) - args.seq_len - 1, (args.batch,), generator=gen)
            ids = torch.stack([stream[s : s + args.seq_len] for s in starts])
            out = model(input_ids=ids, output_router_logits=router_logits)
            losses["source"] = row_loss(out.logits, ids)
            aux = aux + (out.aux_loss if router_logits else 0.0)
        ce = losses.get("source", 0.0) + args.dialogue_weight * losses.get("dialogue", 0.0)
        loss = ce + cfg.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            evaluate = step % (args.log_every * 5) == 0 or step == args.steps - 1
            val = eval_loss(model, val_windows) if evaluate else float("nan")
            val_d = eval_loss(model, *val_dialogues) if evaluate and val_dialogues is not None else float("nan")
            row = (step, *(round(float(losses.get(k, float("nan"))), 4) for k in ("source", "dialogue")),
                   round(val, 4), round(val_d, 4))
            history.append(row)
            print(f"step {step:4d}  source {row[1]:.3f}  dialogue {row[2]:.3f}  val {val:.3f}  val dialogue "
                  f"{val_d:.3f}  lr {opt.param_groups[0]['lr']:.2e}  {time.time() - start:5.0f}s", flush=True)
    return history


def save_assets(model, tokenizer, out: Path, init: Path | None = None) -> None:
    """The model in bfloat16 and the tokenizer; a fine-tune from ``init`` ships init's tokenizer files as they are."""
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.bfloat16)
    # The GDN decay A_log stays float32 (mlx-lm's cast_predicate keeps it so too), which also
    # hands the converter a mixed-dtype checkpoint.
    for layer in model.model.layers:
        if hasattr(layer, "linear_attn"):
            layer.linear_attn.A_log.data = layer.linear_attn.A_log.data.float()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.7
    model.generation_config.top_p = 0.95
    model.generation_config.top_k = 20
    model.save_pretrained(out)
    if init is None:
        tokenizer.save_pretrained(out)
    elif init.resolve() != out.resolve():
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copyfile(init / name, out / name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "flash_moe" / "demo")
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="folder of Python sources to train on (default: this interpreter's stdlib)")
    parser.add_argument("--corpus-bytes", type=int, default=4_000_000, help="stdlib source used for training")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=480)
    parser.add_argument("--batch", type=int, default=16, help="source windows per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--aux-coef", type=float, default=0.001, help="router load-balancing loss; 0 disables")
    # One thread: on a shared 2-core box two threads oversubscribed ran 5-10x slower per step.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--init", type=Path,
                        help="start from this saved demo's weights and tokenizer: only the tool steps run")
    parser.add_argument("--tool-steps", type=int, default=0,
                        help="then as many steps on tool-call dialogues mixed with source windows (0: none)")
    parser.add_argument("--tool-rows", type=int, default=8,
                        help="synthetic tool-call dialogues per tool step (examples/tool_dialogues.py, seed --seed)")
    parser.add_argument("--tool-batch", type=int, default=2, help="source windows per tool step")
    parser.add_argument("--tool-lr", type=float, default=1e-3)
    parser.add_argument("--tool-warmup", type=int, default=10)
    parser.add_argument("--dialogue-weight", type=float, default=1.0,
                        help="weight of the dialogue rows' loss (assistant tokens) against the source rows' loss")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    train_paths, held_out_paths = stdlib_split(args.stdlib, args.corpus_bytes)
    train_texts, held_out_texts = read_sources(train_paths), read_sources(held_out_paths)
    print(f"Python {sys.version.split()[0]}: {len(train_paths)} train files "
          f"({sum(map(len, train_texts)) / 1e6:.2f} M chars), {len(held_out_paths)} held out")

    if args.init:
        init_log = json.loads((args.init / "training_log.json").read_text())
        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.init)  # tokenizer.json as it is
    else:
        tokenizer = train_tokenizer(train_texts, args.vocab_size)
    chats = chat_examples(args.stdlib, train_paths, train_texts, tokenizer, sum(map(len, train_texts)) // 5, args.seed)
    documents = train_texts + chats
    random.Random(args.seed).shuffle(documents)
    stream = token_stream(tokenizer, documents)
    val_stream = token_stream(tokenizer, held_out_texts[:40])
    val_windows = val_stream[: (len(val_stream) // (args.seq_len + 1)) * (args.seq_len + 1)]
    val_windows = val_windows.view(-1, args.seq_len + 1)[:16]
    # Dialogues rendered by flash_moe's own Tokenizer (the template inference uses), from the same folder's files,
    # drawn batch by batch (seed --seed); 16 others (seed --seed + 1000) give the validation loss.
    dialogue_batches, val_dialogues = None, None
    if args.tool_steps:
        from flash_moe.tokenizer import Tokenizer as ChatTokenizer

        folder = args.init or args.out
        if not args.init:
            tokenizer.save_pretrained(folder)  # the template as it will ship
        chat_tokenizer = ChatTokenizer.from_folder(folder)
        drawn = tool_dialogues.batches(args.seed, args.tool_rows)
        dialogue_batches = (shared_prefix_batch(tokenizer, tool_dialogues.render(next(drawn), chat_tokenizer), step)
                            for step in range(args.tool_steps))
        texts = tool_dialogues.render(tool_dialogues.dialogues(16, args.seed + 1000), chat_tokenizer)
        val_dialogues = pad_rows([dialogue_tokens(tokenizer, t, thinking=i % 2 == 1) for i, t in enumerate(texts)],
                                 tokenizer.pad_token_id)
    print(f"tokenizer {len(tokenizer)} ids in {time.time() - t0:.0f}s; {len(chats)} chat examples; "
          f"{len(stream) / 1e6:.2f} M source tokens")

    config = demo_config(tokenizer)
    config.router_aux_loss_coef = args.aux_coef
    if args.init:
        model = Qwen3_5MoeForCausalLM.from_pretrained(args.init, dtype=torch.float32)
        config = model.config
        config.router_aux_loss_coef = args.aux_coef
    else:
        model = Qwen3_5MoeForCausalLM(config).float()
    # The default grouped_mm experts path is ~10x slower than the per-expert loop on CPU.
    model.set_experts_implementation("eager")
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    history = [] if args.init else train(model, stream, val_windows, args)
    tool_history = []
    if args.tool_steps:
        print(f"tool steps: {args.tool_rows} dialogues and {args.tool_batch} source windows per step")
        tool_args = argparse.Namespace(**{**vars(args), "steps": args.tool_steps, "batch": args.tool_batch,
                                          "lr": args.tool_lr, "warmup": args.tool_warmup})
        tool_history = train(model, stream, val_windows, tool_args, dialogue_batches, val_dialogues)

    model.eval()
    usage = expert_usage(model, val_windows[:, :-1])
    print("expert usage (held-out text), top-20% share per layer:", [round(s, 3) for s in top_share(usage).tolist()])
    samples = greedy_samples(model, tokenizer)
    for prompt, text in samples.items():
        print(f"--- greedy from {prompt!r}:\n{text}")

    config.router_aux_loss_coef = 0.001  # Qwen3.5's value for whoever fine-tunes the demo further
    save_assets(model, tokenizer, args.out, args.init)
    (args.out / "training_log.json").write_text(json.dumps({
        "python": sys.version.split()[0],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        "train_files": len(train_paths),
        "train_tokens": len(stream),
        "loss_curve": history,  # (step, source loss, dialogue loss, held-out source loss, held-out dialogue loss)
        "tool_loss_curve": tool_history,
        "top20_share_per_layer": top_share(usage).tolist(),
        "expert_usage": usage.tolist(),
        "greedy_samples": samples,
        "tool_dialogues": args.tool_rows * args.tool_steps,
        "init_training": init_log if args.init else None,
        "wall_s": round(time.time() - t0),
    }, indent=1))
    print(f"saved to {args.out} in {time.time() - t0:.0f}s total")


if __name__ == "__main__":
    main()
