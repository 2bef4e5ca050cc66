"""Write the sample datasets and traces: ``python samples/generate.py [OUT_DIR]``.

Everything is made up here from a seeded generator and a built-in word list
(no downloads), so the files are the same on every run and every machine.
Each file has its own seed, so changing one file's recipe leaves the others as
they were. The texts are random English words, not real conversations.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

BLOCK_TOKENS = 512  # Mooncake's hash_ids block size (envelope.traces.MOONCAKE_BLOCK_TOKENS)

WORDS = tuple(
    """
    the a an of and to in on for with from by at as is are was were be been can will would should may might
    must this that these those it its they their we our you your he she his her who what which when where
    why how all any each every some many more most other such only same new old first last long short high
    low small large good better best right left next early late simple clear common main real whole open
    time year day week hour minute way thing place part case point fact world life work system program
    question answer problem result reason example number group order level value list table record file
    line word page book story letter note report plan idea model method process change step rule test data
    city river road house garden kitchen window door market school office library station bridge forest
    water light sound color music paper stone metal glass wood cloud rain snow wind fire field mountain
    explain describe compare list summarize write show tell give find make take keep use build check
    choose follow start finish open close read learn teach help move turn bring carry hold send receive
    quickly slowly carefully briefly clearly often never always usually sometimes again together
    because although while before after during until unless since through between under over about
    """.split()
)

OPENERS = (
    "Explain",
    "Describe",
    "Summarize",
    "Compare",
    "Write a short note about",
    "List the steps of",
    "Tell me about",
    "Give an example of",
)


def sentence(rng: random.Random, *, question: bool = False) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
    return words[0].capitalize() + " " + " ".join(words[1:]) + ("?" if question else ".")


def text(rng: random.Random, words: int, *, opener: bool = False) -> str:
    """About ``words`` words of sentences; a prompt starts with an instruction."""
    parts: list[str] = []
    count = 0
    if opener:
        first = f"{rng.choice(OPENERS)} the {rng.choice(WORDS)} {rng.choice(WORDS)}."
        parts.append(first)
        count += len(first.split())
    while count < words:
        part = sentence(rng, question=rng.random() < 0.2)
        parts.append(part)
        count += len(part.split())
    return " ".join(parts)


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    """Lengths spread like real prompts: many short ones, a few long ones."""
    return round(low * (high / low) ** rng.random())


def arrival_times(rng: random.Random, count: int, span: float) -> list[float]:
    """Poisson arrivals (exponential gaps), stretched so that the last comes at ``span``."""
    gaps = [rng.expovariate(1.0) for _ in range(count - 1)]
    times = [0.0]
    for gap in gaps:
        times.append(times[-1] + gap * span / sum(gaps))
    return times


def sharegpt(rng: random.Random) -> str:
    conversations = []
    for i in range(40):
        turns = []
        if i % 4 == 1:
            turns.append({"from": "system", "value": text(rng, rng.randint(8, 30))})
        pairs = 1 if i % 3 else rng.randint(2, 4)  # every third conversation goes on for several turns
        for pair in range(pairs):
            asked = log_uniform(rng, 20, 400) if pair == 0 else rng.randint(8, 60)
            turns.append({"from": "human", "value": text(rng, asked, opener=pair == 0)})
            turns.append({"from": "gpt", "value": text(rng, log_uniform(rng, 10, 200))})
        conversations.append({"id": f"sample-{i:03d}", "conversations": turns})
    # One conversation per few lines: its id, then one line per turn.
    blocks = []
    for conversation in conversations:
        turns_json = ",\n".join("    " + json.dumps(turn) for turn in conversation["conversations"])
        blocks.append(f'  {{"id": {json.dumps(conversation["id"])}, "conversations": [\n{turns_json}\n  ]}}')
    return "[\n" + ",\n".join(blocks) + "\n]\n"


def prompts_jsonl(rng: random.Random) -> str:
    lines = []
    for i in range(30):
        if i % 2 == 0:
            entry: dict[str, object] = {"prompt": text(rng, log_uniform(rng, 10, 200), opener=True)}
        else:
            messages = []
            if i % 4 == 1:
                messages.append({"role": "system", "content": text(rng, rng.randint(8, 24))})
            if i % 3 == 0:  # an earlier exchange before the question
                messages.append({"role": "user", "content": text(rng, rng.randint(10, 40), opener=True)})
                messages.append({"role": "assistant", "content": text(rng, rng.randint(10, 60))})
            messages.append({"role": "user", "content": text(rng, log_uniform(rng, 10, 200), opener=True)})
            entry = {"messages": messages}
        if rng.random() < 0.5:
            entry["output_tokens"] = rng.randint(16, 128)
        lines.append(json.dumps(entry))
    return "\n".join(lines) + "\n"


def prompts_txt(rng: random.Random) -> str:
    return "\n".join(text(rng, log_uniform(rng, 8, 120), opener=True) for _ in range(30)) + "\n"


def mooncake(rng: random.Random) -> str:
    # Four "documents" whose first one or two blocks many requests share (as
    # several questions about the same long context would); ids are unique
    # across families, and every other block is new.
    families = [[0], [1, 2], [3], [4, 5]]
    next_id = 6
    lines = []
    for t_ms in arrival_times(rng, 60, 30_000.0):
        family = families[rng.randrange(len(families))] if rng.random() < 0.7 else []
        # More tokens than the shared blocks hold, so each request has its own tail.
        input_length = rng.randint(max(300, BLOCK_TOKENS * len(family) + 1), 1500)
        blocks = -(-input_length // BLOCK_TOKENS)
        hash_ids = family + list(range(next_id, next_id + blocks - len(family)))
        next_id += blocks - len(family)
        entry = {
            "timestamp": round(t_ms),
            "input_length": input_length,
            "output_length": rng.randint(16, 64),
            "hash_ids": hash_ids,
        }
        lines.append(json.dumps(entry))
    return "\n".join(lines) + "\n"


def trace(rng: random.Random) -> str:
    lines = []
    for t_s in arrival_times(rng, 40, 20.0):
        entry: dict[str, object] = {
            "t_s": round(t_s, 3),
            "prompt_tokens": rng.randint(50, 600),
            "output_tokens": rng.randint(16, 64),
        }
        if rng.random() < 0.5:
            entry["session_id"] = f"session-{rng.randint(1, 6)}"
        lines.append(json.dumps(entry))
    return "\n".join(lines) + "\n"


FILES = {
    "sharegpt.json": (sharegpt, 1),
    "prompts.jsonl": (prompts_jsonl, 2),
    "prompts.txt": (prompts_txt, 3),
    "mooncake.jsonl": (mooncake, 4),
    "trace.jsonl": (trace, 5),
}


def generate(out_dir: Path) -> list[Path]:
    """Write every sample file into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (make, seed) in FILES.items():
        path = out_dir / name
        # Bytes, not text mode, so that line endings are the same on every OS.
        path.write_bytes(make(random.Random(seed)).encode("utf-8"))
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print("usage: python samples/generate.py [OUT_DIR]", file=sys.stderr)
        return 2
    out_dir = Path(argv[0]) if argv else Path(__file__).resolve().parent
    for path in generate(out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
