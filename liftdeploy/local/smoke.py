"""A tiny, randomly initialised causal LM built offline, for local smoke tests.

``smoke_model_dir()`` trains a byte-level BPE tokenizer on a small built-in corpus (about a
second), initialises a tiny model of the requested family with a fixed seed and saves both with
``save_pretrained`` so ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained(dir)`` load
them. The result is cached under ``<cache>/<family>-<hash of the recipe>``; it is written to a
temporary directory first and renamed into place, so concurrent builders race safely.

The model's weights are random: its output is gibberish, but every string can be tokenized
(byte-level alphabet) and grammar-constrained decoding produces valid structured output.
The directory carries a ``liftdeploy_smoke.json`` marker so it is never mistaken for a real model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["SMOKE_FAMILIES", "SMOKE_MARKER", "is_smoke_model_dir", "smoke_model_dir", "smoke_recipe"]

SMOKE_MARKER = "liftdeploy_smoke.json"
RECIPE_VERSION = 2
SEED = 1234

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
BOS_CHAT_TOKEN = "<|im_start|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_CHAT_TOKEN, EOS_TOKEN]
BPE_VOCAB_SIZE = 1024
# Qwen2's pre-tokenizer split (digits one by one, letters in runs, punctuation runs).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML, as used by Qwen models (without Qwen's default system prompt).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Architecture of the tiny model; identical shape for every family. vLLM's CPU attention needs
# a head_dim of 64 or more (128 / 2 heads), so the same model runs on both local engines.
_ARCH: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
}

SMOKE_FAMILIES = ("qwen2", "llama")

_BUILD_LOCK = threading.Lock()

_WORDS_TEXT = """
the a an and or not of to in on for with from by as at is are was were be been it this that
these those you we they he she i my your our their what which who when where why how all any
some each every no yes true false null none name type value key id user data text summary intent
signature parameters parameter returns return function method class object array string number
integer boolean list dict map set tuple int float str bool bytes optional required default items
properties description title enum format date time email url path file line code error message
result status ok fail success count total price amount city country age score label tag tags
first last next previous start end min max size length width height color red green blue
def lambda import from print self args kwargs async await yield if else elif while try except
finally raise with pass break continue
"""
_WORDS = _WORDS_TEXT.split()

_CODE = [
    "def add(a: int, b: int) -> int:\n    return a + b\n",
    "class User:\n    def __init__(self, name: str, age: int) -> None:\n        self.name = name\n",
    'for i in range(10):\n    print(i * 2, "done")\n',
    'if x is None or len(items) == 0:\n    raise ValueError("empty")\n',
    'const result = await fetch(url, { method: "POST" });\n',
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;\n",
]

_ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Please return a JSON object that follows the schema exactly.",
    "Summarize the function and list its parameters with their types.",
    "You are a helpful assistant. Answer briefly and precisely!",
    "What is the weather in Paris today? It's sunny, 21 degrees (C).",
    "Extract the name, the age and the city from this sentence: Alice, 30, lives in Berlin.",
]


def _corpus() -> list[str]:
    """A small, deterministic corpus: JSON punctuation, digits, letters, words and code."""
    lines: list[str] = []
    lines.append(" ".join(_WORDS))
    lines.append(" ".join(w.capitalize() for w in _WORDS))
    lines.append("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789")
    lines.append("{ } [ ] : , \" ' ` ~ ! @ # $ % ^ & * ( ) - _ = + \\ | ; < > . / ? \t \n")
    lines.extend(str(n) for n in range(0, 1000, 7))
    lines.extend(f"{n}.{n % 10}{(n * 3) % 10}" for n in range(0, 200, 3))
    lines.extend(_CODE)
    lines.extend(_ENGLISH)
    n = len(_WORDS)
    for i in range(300):
        k1, k2, k3 = _WORDS[i % n], _WORDS[(i * 7 + 3) % n], _WORDS[(i * 13 + 5) % n]
        lines.append(json.dumps({k1: k2, k3: i, "items": [k1, k2], "ok": i % 2 == 0, "x": None}))
        lines.append(json.dumps({k2: {k1: [i, i + 1.5]}, "name": k3.title()}, indent=2))
    return lines


def smoke_recipe(family: str = "qwen2") -> dict[str, Any]:
    """Everything that determines the smoke model's content (hashed into its cache dir name)."""
    import transformers

    family = _normalize_family(family)
    corpus_hash = hashlib.sha256("\n".join(_corpus()).encode()).hexdigest()
    return {
        "recipe_version": RECIPE_VERSION,
        "family": family,
        "arch": _ARCH,
        "seed": SEED,
        "tokenizer": {
            "type": "byte-level-bpe",
            "normalizer": "NFC",
            "pretokenize_regex": PRETOKENIZE_REGEX,
            "vocab_size": BPE_VOCAB_SIZE,
            "special_tokens": SPECIAL_TOKENS,
            "eos": EOS_TOKEN,
            "pad": PAD_TOKEN,
            "corpus_sha256": corpus_hash,
        },
        "chat_template": CHAT_TEMPLATE,
        # The on-disk format of save_pretrained changed across major versions.
        "transformers_major": transformers.__version__.split(".")[0],
    }


def _normalize_family(family: str) -> str:
    family = (family or "qwen2").strip().lower()
    if family in ("llama", "llama2", "llama3", "mistral"):
        return "llama"
    return "qwen2"  # qwen, qwen2, qwen2.5, qwen3 and anything unknown


def _recipe_hash(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def cache_home() -> Path:
    """Where liftdeploy keeps the local models it builds: ``$LIFTDEPLOY_CACHE`` or ``~/.cache/liftdeploy``."""
    base = os.environ.get("LIFTDEPLOY_CACHE")
    return Path(base).expanduser() if base else Path.home() / ".cache" / "liftdeploy"


def default_cache_root() -> Path:
    """``<cache>/smoke-models``."""
    return cache_home() / "smoke-models"


def is_smoke_model_dir(path: str | Path) -> bool:
    return (Path(path) / SMOKE_MARKER).is_file()


def smoke_model_dir(family: str = "qwen2", cache_dir: Path | None = None) -> Path:
    """Return the directory of the tiny smoke model for ``family``, building it once.

    ``cache_dir`` is the directory holding the ``<family>-<hash>`` model dirs; by default
    :func:`default_cache_root`. Unknown families map to ``qwen2``.
    """
    recipe = smoke_recipe(family)
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    final = root / f"{recipe['family']}-{_recipe_hash(recipe)}"
    if is_smoke_model_dir(final):
        return final
    # In-process builders take turns (the build seeds torch's global RNG, so threads must not
    # interleave); other processes are handled by building in a temp dir and renaming it.
    with _BUILD_LOCK:
        if is_smoke_model_dir(final):
            return final
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the renamed dir should be readable like any cache
        try:
            t0 = time.perf_counter()
            _build(recipe, tmp)
            marker = dict(recipe)
            marker.pop("chat_template", None)
            marker["smoke"] = True
            marker["note"] = (
                "Randomly initialised smoke-test model built by liftdeploy; its output is gibberish."
            )
            marker["build_seconds"] = round(time.perf_counter() - t0, 3)
            # the marker is written last: a dir with a marker is complete
            (tmp / SMOKE_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
            try:
                os.rename(tmp, final)
            except OSError:
                # Another process won the race (final exists and is non-empty): use theirs.
                if not is_smoke_model_dir(final):
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # The same normalizer / pre-tokenizer pipeline as Qwen2 tokenizers: transformers 5 rebuilds
    # exactly this pipeline when it loads a "qwen2" model's tokenizer (Qwen2Tokenizer), so the
    # saved tokenizer.json and the loaded tokenizer agree for both families.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=_ARCH["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def _build(recipe: dict[str, Any], out: Path) -> None:
    import torch
    from transformers import GenerationConfig

    hf_tok = _build_tokenizer()
    vocab_size = len(hf_tok)
    eos_id = hf_tok.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = hf_tok.convert_tokens_to_ids(PAD_TOKEN)

    if recipe["family"] == "llama":
        from transformers import LlamaConfig as Config
        from transformers import LlamaForCausalLM as Model
    else:
        from transformers import Qwen2Config as Config
        from transformers import Qwen2ForCausalLM as Model
    config = Config(
        vocab_size=vocab_size, eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None, **_ARCH
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        model = Model(config)
    model.eval()
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None, do_sample=False
    )
    hf_tok.save_pretrained(out)
    with quiet_progress_bars():
        model.save_pretrained(out)


@contextlib.contextmanager
def quiet_progress_bars():
    """Silence transformers' progress bars (weights loading/writing) for the duration."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
