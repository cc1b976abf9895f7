#!/usr/bin/env python3
"""Bytes of UTF-8 a token, counted by Meta's own Llama 3 and Llama 4
tokenizers, for the kinds of text a prompt holds: the figures behind the
gateway's prompt estimate (4 bytes a token) and the most it reserves for a
prompt (a token a byte), docs/metering.md#the-most-a-prompt-can-be.

    pip install tiktoken
    benches/tokens/bytes_per_token.py

Fetches `llama-models` (Meta's package, which ships both tokenizers'
ranks) from PyPI into a temp dir with pip; reaches nothing else.
"""

import base64
import random
import string
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

ROOT = Path(__file__).resolve().parent.parent.parent
LLAMA_MODELS = "llama-models==0.3.0"
# The pre-tokenizers' patterns, from llama_models/llama{3,4}/tokenizer.py.
LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA4 = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def tokenizers(work):
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", work, LLAMA_MODELS],
        check=True,
    )
    wheel = next(Path(work).glob("llama_models-*.whl"))
    encodings = []
    with zipfile.ZipFile(wheel) as z:
        for name, pattern in [("llama3", LLAMA3), ("llama4", LLAMA4)]:
            path = Path(work) / f"{name}.model"
            path.write_bytes(z.read(f"llama_models/{name}/tokenizer.model"))
            ranks = load_tiktoken_bpe(str(path))
            encodings.append(tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={}))
    return encodings


def samples():
    rng = random.Random(7)
    fixtures = ROOT / "tests" / "fixtures" / "openai"
    return {
        "English prose (README.md)": (ROOT / "README.md").read_text()[:20000],
        "Rust source": (ROOT / "src" / "pipeline" / "stream.rs").read_text()[:20000],
        "JSON (vLLM's chat stream)": (fixtures / "vllm_chat_usage.sse").read_text(),
        "Chinese": "人工智能是计算机科学的一个分支，它企图了解智能的实质，并生产出一种新的能以人类智能相似的方式做出反应的智能机器。" * 40,
        "Japanese": "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所でニャーニャー泣いていた事だけは記憶している。" * 40,
        "Korean": "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다." * 40,
        "Hindi": "भारत एक संप्रभु, समाजवादी, धर्मनिरपेक्ष, लोकतांत्रिक गणराज्य है। सभी नागरिकों को न्याय मिलेगा।" * 40,
        "Russian": "Все счастливые семьи похожи друг на друга, каждая несчастливая семья несчастлива по-своему." * 40,
        "Thai": "ประเทศไทยเป็นราชอาณาจักรอันหนึ่งอันเดียว จะแบ่งแยกมิได้" * 40,
        "emoji": "😀🎉🚀🔥💯🙏🏽👨‍👩‍👧‍👦🇫🇷" * 100,
        "random printable ASCII": "".join(rng.choice(string.printable[:94]) for _ in range(4000)),
        "base64": base64.b64encode(bytes(rng.randrange(256) for _ in range(3000))).decode(),
        "digits between spaces": " ".join(str(i % 10) for i in range(2000)),
        # Dense text a model writes, which a stream's check must not take
        # for more tokens than it is (the gateway counts 16 bytes a token
        # at most, bar runs of one character).
        "Markdown table": "| name | region | price |\n|------------|--------|-------|\n"
        + "| llama-3.3-70b | eu-west-1 | 0.88 |\n" * 100,
        "a table's rule rows": ("|" + "-" * 30 + "|" + "-" * 30 + "|\n") * 50,
        "indented code": "class Cache:\n    def get(self, key):\n        if key in self.entries:\n"
        "            return self.entries[key]\n        return None\n" * 60,
        "code indented 24 spaces": "                        return self.value\n" * 100,
        "a row of dashes": "-" * 4000,
        "a row of box drawing": "─" * 2000,
    }


def main():
    with tempfile.TemporaryDirectory() as work:
        llama3, llama4 = tokenizers(work)
        print(f"{'text':28} {'bytes':>6} {'Llama 3':>8} {'Llama 4':>8}   (bytes a token)")
        for name, text in samples().items():
            size = len(text.encode())
            per = [size / len(e.encode(text, disallowed_special=())) for e in (llama3, llama4)]
            print(f"{name:28} {size:6} {per[0]:8.2f} {per[1]:8.2f}")


if __name__ == "__main__":
    main()
