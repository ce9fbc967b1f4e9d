"""Synthetic tool-call dialogues for the demo model (stdlib only; imported by train_demo_model.py and the tests).

Each dialogue: a user request that one tool answers, the assistant's single call, the tool's result fed
back, and a short answer. The tools are the chat's built-ins (``flash_moe.tools.BUILTIN_TOOLS``, all four
offered, as ``flash-moe chat`` does) and the ten of the bundled tool-call suite (the expected one plus two
others, shuffled, as the suite offers them). Requests come from templates filled with random values, so
a different seed gives held-out instances of the same distribution.

    python examples/tool_dialogues.py --suite held_out.jsonl --n 200 --seed 1   # an eval suite
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from flash_moe.eval.tools import SUITE
from flash_moe.tools import BUILTIN_TOOLS

CITIES = ["Paris", "Tokyo", "Chicago", "Berlin", "Lisbon", "Nairobi", "Oslo", "Lima", "Cairo", "Seoul", "Madrid",
          "Toronto", "Sydney", "Dublin", "Quito", "Hanoi", "Vienna", "Prague", "Denver", "Mumbai"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "NZD", "SEK", "INR"]
TOPICS = ["the history of Unix", "mixture of experts models", "solid state drives", "the tallest mountain in Asia",
          "python decorators", "bread recipes", "the moon landing", "electric cars", "sorting algorithms",
          "jazz music", "the Roman empire", "rust lifetimes", "tidal energy", "chess openings", "coral reefs"]
NAMES = ["bob", "anna", "ops", "team", "lee", "maria", "sam", "kim", "joe", "eva"]
DOMAINS = ["example.com", "example.org", "mail.test"]
SUBJECTS = ["Lunch", "Report", "Release", "Server down", "Meeting", "Invoice", "Holiday", "Update"]
BODIES = ["See you at noon.", "The report is attached.", "Version 2.0 is out.", "The build is green.",
          "Call me later.", "Thanks for the help.", "The server is back."]
LABELS = ["focus", "pasta", "tea", "break", "laundry", "eggs", "nap"]
TITLES = ["Dentist", "Team sync", "Design review", "Birthday party", "Yoga", "Standup", "Lunch with Sam"]
SYMBOLS = ["AAPL", "IBM", "NVDA", "VOD", "MSFT", "TSLA", "AMZN", "SAP"]
EXCHANGES = ["NYSE", "NASDAQ", "LSE"]
PHRASES = ["good morning", "thank you very much", "where is the station?", "I love reading", "see you soon",
           "how much is it?", "the cat is asleep"]
LANGUAGES = ["Spanish", "Japanese", "German", "French", "Italian", "Dutch", "Korean"]
FILES = ["README.md", "setup.py", "config.json", "src/main.py", "docs/usage.md", "notes.txt", "pyproject.toml",
         "app/models.py", "data/input.csv", "Makefile"]
FOLDERS = ["/tmp", ".", "src", "docs", "/var/log", "~/projects", "data", "tests", "/etc", "build"]
COMMANDS = ["ls -la", "pwd", "git status", "df -h", "uname -a", "whoami", "date", "python --version", "du -sh .",
            "echo hello"]
ENTRIES = ["a.txt", "main.py", "notes.md", "data/", "build/", "setup.py", "log.txt", "img.png", "lib/", "run.sh"]


def _email(r):
    return f"{r.choice(NAMES)}@{r.choice(DOMAINS)}"


def _date(r):
    return f"2026-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"


def _expr(r):
    a, b, c = r.randint(2, 99), r.randint(2, 99), r.randint(2, 9)
    return r.choice([f"{a} * {b}", f"({a} + {b}) * {c}", f"{a} - {b}", f"{a} / {c}", f"{c} ** {c} - 1"])


def _scenarios():
    """(tool name, sampler) pairs; a sampler returns (request, arguments, result, answer)."""
    def weather(r):
        city, days, unit = r.choice(CITIES), r.randint(2, 7), r.choice(["celsius", "fahrenheit"])
        return r.choice([
            (f"What's the weather in {city} right now?", {"city": city}),
            (f"Is it raining in {city}?", {"city": city}),
            (f"Give me a {days} day forecast for {city}.", {"city": city, "days": days}),
            (f"Forecast for {city}, {days} days.", {"city": city, "days": days}),
            (f"How warm is it in {city}, in {unit}?", {"city": city, "unit": unit}),
        ]) + (json.dumps({"city": city, "temp": r.randint(-5, 35), "sky": "clear"}), f"It is clear in {city}.")

    def currency(r):
        amount = r.choice([r.randint(1, 2000), round(r.uniform(1, 500), 2)])
        a, b = r.sample(CURRENCIES, 2)
        return r.choice([
            (f"Convert {amount} {a} to {b}.", {"amount": amount, "from": a, "to": b}),
            (f"Change {amount} {a} into {b}.", {"amount": amount, "from": a, "to": b}),
            (f"How much is {amount} {a} in {b}?", {"amount": amount, "from": a, "to": b}),
        ]) + (json.dumps({"result": round(amount * 1.1, 2)}), f"That is {round(amount * 1.1, 2)} {b}.")

    def search(r):
        topic, n = r.choice(TOPICS), r.randint(2, 10)
        return r.choice([
            (f"Search the web for {topic}.", {"query": topic}),
            (f"Look up {topic}.", {"query": topic}),
            (f"Find me {n} results about {topic}.", {"query": topic, "max_results": n}),
            (f"Search for '{topic}' and give me {n} results.", {"query": topic, "max_results": n}),
        ]) + (json.dumps([{"title": topic.title(), "url": "https://example.com/1"}]), f"I found a page on {topic}.")

    def email(r):
        to, subject, body = _email(r), r.choice(SUBJECTS), r.choice(BODIES)
        return r.choice([
            (f"Email {to} with subject '{subject}' and say '{body}'", {"to": to, "subject": subject, "body": body}),
            (f"Mail {to} the subject '{subject}' with the message '{body}'", {"to": to, "subject": subject, "body": body}),
            (f"Send an urgent email to {to}, subject '{subject}', body '{body}'",
             {"to": to, "subject": subject, "body": body, "urgent": True}),
        ]) + ('{"sent": true}', f"The email to {to} is sent.")

    def timer(r):
        minutes, label = r.randint(1, 90), r.choice(LABELS)
        return r.choice([
            (f"Set a timer for {minutes} minutes.", {"minutes": minutes}),
            (f"Start a {minutes} minute timer labelled {label}.", {"minutes": minutes, "label": label}),
            (f"Timer for the {label}: {minutes} minutes.", {"minutes": minutes, "label": label}),
            (f"Remind me in {minutes} minutes with a timer.", {"minutes": minutes}),
        ]) + ('{"started": true}', f"The timer runs for {minutes} minutes.")

    def event(r):
        title, date, time = r.choice(TITLES), _date(r), f"{r.randint(8, 18):02d}:{r.choice(['00', '30'])}"
        return r.choice([
            (f"Put '{title}' in my calendar on {date}.", {"title": title, "date": date}),
            (f"Create an event '{title}' on {date} at {time}.", {"title": title, "date": date, "time": time}),
            (f"Add a calendar entry called '{title}' for {date}.", {"title": title, "date": date}),
        ]) + ('{"created": true}', f"'{title}' is in your calendar on {date}.")

    def stock(r):
        symbol, exchange = r.choice(SYMBOLS), r.choice(EXCHANGES)
        return r.choice([
            (f"What is {symbol} trading at?", {"symbol": symbol}),
            (f"Price of {symbol} on the {exchange}?", {"symbol": symbol, "exchange": exchange}),
            (f"Get the latest price for {symbol} on {exchange}.", {"symbol": symbol, "exchange": exchange}),
        ]) + (json.dumps({"price": r.randint(10, 900)}), f"{symbol} is at the price above.")

    def translate(r):
        text, lang = r.choice(PHRASES), r.choice(LANGUAGES)
        return r.choice([
            (f"Translate '{text}' into {lang}.", {"text": text, "target_language": lang}),
            (f"How do you say '{text}' in {lang}?", {"text": text, "target_language": lang}),
            (f"Put '{text}' into {lang}.", {"text": text, "target_language": lang}),
        ]) + (json.dumps({"translation": "..."}), f"Here is '{text}' in {lang}.")

    def calculate(r):
        expr = _expr(r)
        return r.choice([
            (f"What is {expr}?", {"expression": expr}),
            (f"Compute {expr}.", {"expression": expr}),
            (f"Calculate {expr}.", {"expression": expr}),
        ]) + (json.dumps({"result": 42}), "The result is 42.")

    def suite_read(r):
        path, n = r.choice(FILES), r.randint(3, 50)
        return r.choice([
            (f"Show me the file {path}.", {"path": path}),
            (f"Print the contents of {path}.", {"path": path}),
            (f"Read the first {n} lines of {path}.", {"path": path, "max_lines": n}),
        ]) + ("line one\nline two", f"{path} starts with 'line one'.")

    def list_dir(r):
        folder = r.choice(FOLDERS)
        entries = sorted(r.sample(ENTRIES, r.randint(1, 5)))
        return r.choice([
            (f"List the files in {folder}.", {"path": folder}),
            (f"What is in the folder {folder}?", {"path": folder}),
            (f"Show the directory {folder}.", {"path": folder}),
            (f"ls {folder}", {"path": folder}),
        ]) + ("\n".join(entries), f"{folder} holds {len(entries)} entries: {', '.join(entries)}.")

    def read_builtin(r):
        path = r.choice(FILES)
        return r.choice([
            (f"Read {path}.", {"path": path}),
            (f"Show me the file {path}.", {"path": path}),
            (f"What does {path} say?", {"path": path}),
        ]) + ("import os\nprint('hello')", f"{path} has two lines: an import and a print.")

    def now(r):
        stamp = f"{_date(r)}T{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:00"
        return r.choice([("What time is it?", {}), ("What's the date today?", {}), ("Tell me the current time.", {}),
                         ("What day is it?", {})]) + (stamp, f"It is {stamp.replace('T', ' ')}.")

    def shell(r):
        command = r.choice(COMMANDS)
        return r.choice([
            (f"Run `{command}`.", {"command": command}),
            (f"Run the command {command}", {"command": command}),
            (f"Execute `{command}` in the shell.", {"command": command}),
        ]) + ("ok\n(exit status 0)", f"`{command}` ran and exited with status 0.")

    suite = [("get_weather", weather), ("convert_currency", currency), ("search_web", search), ("send_email", email),
             ("set_timer", timer), ("create_event", event), ("get_stock_price", stock),
             ("translate_text", translate), ("calculate", calculate), ("read_file", suite_read)]
    builtin = [("list_directory", list_dir), ("read_file", read_builtin), ("current_time", now), ("run_shell", shell)]
    return suite, builtin


def suite_tools() -> dict[str, dict]:
    """The ten tool schemas of the bundled suite, by name."""
    tools = {}
    for line in SUITE.read_text(encoding="utf-8").splitlines():
        for tool in json.loads(line)["tools"] if line.strip() else []:
            tools.setdefault(tool["function"]["name"], tool)
    return tools


def _dialogue(r, name: str, sample, tools: list) -> dict:
    request, arguments, result, answer = sample(r)
    messages = [{"role": "user", "content": request},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                    "name": name, "arguments": arguments}}]},
                {"role": "tool", "content": result},
                {"role": "assistant", "content": answer}]
    return {"messages": messages, "tools": tools, "expected": {"name": name, "arguments": arguments}}


def dialogues(n: int, seed: int, builtin_share: float = 0.4) -> list[dict]:
    """``n`` items ``{"messages": [user, assistant call, tool result, answer], "tools", "expected"}``."""
    r = random.Random(seed)
    suite, builtin = _scenarios()
    schemas = suite_tools()
    items = []
    for _ in range(n):
        if r.random() < builtin_share:
            name, sample = r.choice(builtin)
            tools = BUILTIN_TOOLS
        else:
            name, sample = r.choice(suite)
            others = r.sample([t for t in schemas if t != name], 2)
            tools = [schemas[t] for t in r.sample([name, *others], 3)]
        items.append(_dialogue(r, name, sample, tools))
    return items


def batches(seed: int, rows: int, builtin_share: float = 0.4):
    """Endless batches of ``rows`` dialogues that share one tool list, so they share one system prompt (the
    training computes it once per batch): the built-in tools, or three suite tools in a random order with
    each dialogue's tool drawn among them. Per dialogue, the distribution of ``dialogues``."""
    r = random.Random(seed)
    suite, builtin = _scenarios()
    schemas = suite_tools()
    while True:
        if r.random() < builtin_share:
            yield [_dialogue(r, *r.choice(builtin), BUILTIN_TOOLS) for _ in range(rows)]
        else:
            offered = r.sample(suite, 3)
            tools = [schemas[name] for name, _ in offered]
            yield [_dialogue(r, *r.choice(offered), tools) for _ in range(rows)]


def training_requests(seed: int, rows: int, steps: int) -> set[str]:
    """The user requests ``batches(seed, rows)`` draws in ``steps`` batches: what a held-out suite leaves out."""
    drawn = batches(seed, rows)
    return {d["messages"][0]["content"] for _ in range(steps) for d in next(drawn)}


def render(items: list[dict], tokenizer) -> list[str]:
    """Each dialogue as the chat template writes it: exactly the text inference sees."""
    return [tokenizer.apply_chat_template(d["messages"], tools=d["tools"], tokenize=False) for d in items]


def held_out_suite(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """Eval items (the request only) whose request text is not in ``exclude`` (the training requests)."""
    return [{"id": i, "messages": d["messages"][:1], "tools": d["tools"], "expected": d["expected"]}
            for i, d in enumerate(dialogues(n, seed)) if d["messages"][0]["content"] not in exclude]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", type=Path, required=True, help="write an eval suite (JSONL) here")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--exclude-seed", type=int, default=0, help="drop requests the training (this seed) drew")
    parser.add_argument("--exclude-rows", type=int, default=6, help="the training's dialogues per batch")
    parser.add_argument("--exclude-steps", type=int, default=400, help="the training's steps")
    args = parser.parse_args()
    seen = training_requests(args.exclude_seed, args.exclude_rows, args.exclude_steps)
    items = held_out_suite(args.n, args.seed, seen)
    args.suite.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    print(f"{len(items)} held-out items written to {args.suite}")


if __name__ == "__main__":
    main()
