"""A CPU engine with the same interface as the rendered vLLM engine.

Generation is a hand-written decode loop (transformers model forward with a KV cache) in which
an :class:`xgrammar.GrammarMatcher` fills a token bitmask before every sampling step, so the
output is constrained to the JSON schema's grammar. Writing the loop ourselves (rather than
``model.generate`` with ``xgr.contrib.hf.LogitsProcessor``) lets the engine report
``finish_reason`` exactly like vLLM does:

* ``"stop"``   -- a stop token (EOS) was sampled; with a schema this only becomes possible once
  the grammar has completed, so the text is then a complete JSON document;
* ``"length"`` -- ``max_tokens`` tokens were generated (or the context window was filled) first.

As in vLLM, the stop token counts towards ``completion_tokens`` but is not part of ``text``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["LocalEngine"]

_GRAMMAR_CACHE_SIZE = 128
# As in vLLM (vllm.sampling_params._SAMPLING_EPS): a temperature below this samples greedily. A tiny
# positive temperature (the API accepts e.g. 5e-324) would otherwise overflow `logits / temperature`
# to inf, softmax to NaN, and fail the request with a 503.
_SAMPLING_EPS = 1e-5


class LocalEngine:
    """Schema-constrained JSON generation on CPU (transformers + XGrammar).

    ``model_path`` is a local Hugging Face model directory; ``None`` serves the built-in tiny
    smoke model of ``family`` (see :func:`liftdeploy.local.smoke.smoke_model_dir`).
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        max_model_len: int = 4096,
        seed: int = 0,
        family: str = "qwen2",
    ) -> None:
        from liftdeploy.local.smoke import _normalize_family, is_smoke_model_dir

        self.model_path: Path | None = Path(model_path).expanduser() if model_path is not None else None
        self.max_model_len = int(max_model_len)
        self.seed = int(seed)
        self.family = _normalize_family(family)
        if self.model_path is None:
            self.name = f"smoke:{self.family}"
            self.is_smoke = True
        else:
            self.name = self.model_path.name or str(self.model_path)
            self.is_smoke = is_smoke_model_dir(self.model_path)
        self.ready = False
        self.load_seconds: float | None = None

        self.tokenizer: Any = None
        self.model: Any = None
        self.vocab_size: int | None = None
        self.stop_token_ids: list[int] = []
        self._tokenizer_info: Any = None
        self._byte_guard: _ByteGuard | None = None
        self._compiler: Any = None
        self._grammars: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._grammar_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._generate_lock = threading.Lock()  # one generation at a time on the model

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Load tokenizer and model on CPU and build the XGrammar compiler (idempotent)."""
        with self._start_lock:
            if self.ready:
                return
            t0 = time.perf_counter()
            import torch
            import xgrammar as xgr
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from liftdeploy.local.smoke import quiet_progress_bars, smoke_model_dir

            path = self.model_path if self.model_path is not None else smoke_model_dir(self.family)
            tokenizer = AutoTokenizer.from_pretrained(path)
            with quiet_progress_bars():
                try:
                    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
                except TypeError:  # transformers < 4.56 spells it torch_dtype
                    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
            model.eval()

            # The logits' width can exceed len(tokenizer) (vocab padded for the GPU); the
            # bitmask must cover all of it.
            vocab_size = int(model.get_output_embeddings().weight.shape[0])
            vocab_size = max(vocab_size, int(getattr(model.config, "vocab_size", 0) or 0))
            stop_ids: list[int] = []
            for ids in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
                for i in ids if isinstance(ids, (list, tuple)) else [ids]:
                    if i is not None and int(i) not in stop_ids:
                        stop_ids.append(int(i))
            if not stop_ids:
                raise RuntimeError(f"model {path} defines no eos token; cannot detect the end of generation")

            info = xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids
            )
            self._tokenizer_info = info
            self._byte_guard = _ByteGuard(info.decoded_vocab, vocab_size, stop_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            self.tokenizer = tokenizer
            self.model = model
            self.vocab_size = vocab_size
            self.stop_token_ids = stop_ids
            self.resolved_path = Path(path)
            self.load_seconds = time.perf_counter() - t0
            self.ready = True

    # ------------------------------------------------------------------ schemas
    def check_schema(self, schema: dict) -> None:
        """Raise ``ValueError`` if ``schema`` is not a valid JSON Schema or cannot be compiled."""
        self._compiled_grammar(schema)

    def _compiled_grammar(self, schema: dict) -> Any:
        if not isinstance(schema, dict):
            raise ValueError(f"schema must be a JSON object, not {type(schema).__name__}")  # noqa: TRY004
        try:
            key = json.dumps(schema, sort_keys=True)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"schema is not JSON-serialisable: {exc}") from exc
        with self._grammar_lock:
            cached = self._grammars.get(key)
            if cached is not None:
                self._grammars.move_to_end(key)
                return cached
        import jsonschema

        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"invalid JSON Schema: {exc.message}") from exc
        except RecursionError:  # jsonschema walks the schema recursively: ~100 levels of arrays is its limit
            raise ValueError("schema nests too deeply to be checked") from None
        if not self.ready:
            self.start()
        try:
            compiled = self._compiler.compile_json_schema(key, any_whitespace=False, strict_mode=True)
        except Exception as exc:  # xgrammar raises RuntimeError / InvalidJSONError subclasses
            # drop the C++ location prefix: "[13:42:54] /project/cpp/json_schema_converter.cc:4950: "
            why = re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", str(exc).strip())
            raise ValueError(f"XGrammar cannot compile the schema: {why}") from exc
        if not _allows_a_first_token(compiled, self.vocab_size):  # e.g. {"$ref": "#"}: nothing to start with
            raise ValueError("the schema admits no JSON value (no token can start one)")
        with self._grammar_lock:
            self._grammars[key] = compiled
            self._grammars.move_to_end(key)
            while len(self._grammars) > _GRAMMAR_CACHE_SIZE:
                self._grammars.popitem(last=False)
        return compiled

    # ------------------------------------------------------------------ generation
    async def generate(
        self,
        messages: list[dict[str, str]],
        schema: dict | None,
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
    ) -> dict:
        """Generate a completion for ``messages``, constrained to ``schema`` when given.

        Returns ``{"text", "prompt_tokens", "completion_tokens", "finish_reason"}``.
        """
        return await asyncio.to_thread(
            self._generate_blocking, messages, schema, max_tokens, temperature, top_p
        )

    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        # A base model without a chat template: plain "role: content" lines.
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return list(tok(text)["input_ids"])

    def _generate_blocking(
        self,
        messages: list[dict[str, str]],
        schema: dict | None,
        max_tokens: int,
        temperature: float,
        top_p: float,
    ) -> dict:
        import torch
        import xgrammar as xgr

        if not self.ready:
            self.start()
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        compiled = self._compiled_grammar(schema) if schema is not None else None
        prompt_ids = self._prompt_ids(messages)
        n_prompt = len(prompt_ids)
        if n_prompt >= self.max_model_len:
            raise ValueError(f"prompt is {n_prompt} tokens; max_model_len is {self.max_model_len}")
        budget = min(int(max_tokens), self.max_model_len - n_prompt)

        with self._generate_lock, torch.inference_mode(), _torch_threads(1 if self.is_smoke else None):
            matcher = xgr.GrammarMatcher(compiled) if compiled is not None else None
            bitmask = xgr.allocate_token_bitmask(1, self.vocab_size) if matcher is not None else None
            guard = self._byte_guard.session()
            generator = torch.Generator().manual_seed(self.seed)
            stop_ids = set(self.stop_token_ids)
            out_ids: list[int] = []
            finish_reason = "length"
            past = None
            next_input = torch.tensor([prompt_ids], dtype=torch.long)
            for _ in range(budget):
                out = self.model(input_ids=next_input, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1, :].float()
                if logits.shape[-1] < self.vocab_size:
                    pad = torch.full((1, self.vocab_size - logits.shape[-1]), float("-inf"))
                    logits = torch.cat([logits, pad], dim=-1)
                if matcher is not None:
                    matcher.fill_next_token_bitmask(bitmask)
                    xgr.apply_token_bitmask_inplace(logits, bitmask)
                    if not torch.isfinite(logits).any():  # a dead end of the schema, not an engine failure
                        so_far = self.tokenizer.decode(out_ids, skip_special_tokens=True)
                        raise ValueError(f"the schema admits no continuation of {so_far[-80:]!r}")
                    guarded = logits[0].masked_fill(guard.disallowed(), float("-inf"))
                    if torch.isfinite(guarded).any():  # never stricter than the grammar itself
                        logits[0] = guarded
                token = _sample(logits[0], temperature, top_p, generator)
                if matcher is not None:
                    if not matcher.accept_token(token):
                        raise RuntimeError(f"grammar matcher rejected token {token} it allowed")
                    guard.accept(token)
                out_ids.append(token)
                if token in stop_ids or (matcher is not None and matcher.is_terminated()):
                    finish_reason = "stop"
                    break
                next_input = torch.tensor([[token]], dtype=torch.long)

        text_ids = [t for t in out_ids if t not in stop_ids]
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        return {
            "text": text,
            "prompt_tokens": n_prompt,
            "completion_tokens": len(out_ids),
            "finish_reason": finish_reason,
        }


def _allows_a_first_token(compiled: Any, vocab_size: int) -> bool:
    """Whether a generation constrained to ``compiled`` can emit anything at all."""
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    return bool((bitmask != 0).any()) or matcher.is_terminated()


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Temporarily use ``n`` intra-op threads. The smoke model (hidden size 64) only loses from
    thread hand-offs: one thread is ~10x faster per step than two on a busy 2-core machine."""
    import torch

    if n is None or torch.get_num_threads() == n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sample(logits: Any, temperature: float, top_p: float, generator: Any) -> int:
    """Pick the next token from masked logits (1-D): greedy at temperature ~0, else top-p sampling."""
    import torch

    if not torch.isfinite(logits).any():
        raise RuntimeError("no token is allowed at this step (the grammar admits none of the vocabulary)")
    if temperature < _SAMPLING_EPS:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_idx = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = (cumulative - sorted_probs) < top_p
        keep[0] = True
        filtered = torch.zeros_like(probs)
        filtered[sorted_idx[keep]] = sorted_probs[keep]
        probs = filtered
    return int(torch.multinomial(probs, 1, generator=generator).item())


class _ByteGuard:
    r"""Extra token masks applied under a schema, on top of XGrammar's bitmask.

    XGrammar 0.2.8 compiles length-bounded JSON strings (``maxLength``/``minLength``) to the
    character class ``[^"\\\r\n]{m,n}``, which (a) admits raw control characters U+0000-U+001F
    that JSON forbids unescaped, and (b) accepts byte sequences that are not valid UTF-8 (e.g. the
    surrogate ``\xed\xb0\xa9``), which decode to U+FFFD and break ``maxLength``. Compact JSON
    (``any_whitespace=False``) never needs a raw control byte and valid output is valid UTF-8, so
    these masks only remove tokens that cannot lead to a valid document.
    """

    _TAIL_CACHE = 256

    def __init__(self, decoded_vocab: list[bytes], vocab_size: int, stop_ids: list[int]) -> None:
        import torch

        self.vocab: list[bytes] = list(decoded_vocab[:vocab_size]) + [b""] * max(
            0, vocab_size - len(decoded_vocab)
        )
        self.vocab_size = vocab_size
        stops = set(stop_ids)
        bad = torch.zeros(vocab_size, dtype=torch.bool)
        # tokens beginning with a UTF-8 continuation byte: the only candidates after a partial char
        self.continuations: list[int] = []
        for i, raw in enumerate(self.vocab):
            if i in stops:
                continue
            if not raw or not _valid_utf8_prefix(b"", raw):
                bad[i] = True
            if raw and 0x80 <= raw[0] <= 0xBF:
                self.continuations.append(i)
        self.bad_at_boundary = bad
        self._tail_masks: collections.OrderedDict[bytes, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def disallowed_after(self, tail: bytes) -> Any:
        """Mask of tokens that cannot follow the incomplete UTF-8 sequence ``tail``."""
        import torch

        if not tail:
            return self.bad_at_boundary
        with self._lock:
            mask = self._tail_masks.get(tail)
            if mask is not None:
                self._tail_masks.move_to_end(tail)
                return mask
        mask = torch.ones(self.vocab_size, dtype=torch.bool)
        for i in self.continuations:
            if _valid_utf8_prefix(tail, self.vocab[i]):
                mask[i] = False
        with self._lock:
            self._tail_masks[tail] = mask
            while len(self._tail_masks) > self._TAIL_CACHE:
                self._tail_masks.popitem(last=False)
        return mask

    def session(self) -> _ByteGuardSession:
        return _ByteGuardSession(self)


class _ByteGuardSession:
    """Tracks the incomplete trailing UTF-8 bytes of one generation."""

    def __init__(self, guard: _ByteGuard) -> None:
        self.guard = guard
        self.tail = b""

    def disallowed(self) -> Any:
        return self.guard.disallowed_after(self.tail)

    def accept(self, token: int) -> None:
        tail = _utf8_tail(self.tail + self.guard.vocab[token])
        self.tail = tail if tail is not None else b""  # None only via the grammar-only fallback


def _valid_utf8_prefix(tail: bytes, raw: bytes) -> bool:
    """True if ``tail + raw`` is valid UTF-8 (possibly ending mid-character) without control chars."""
    return _utf8_tail(tail + raw) is not None


def _utf8_tail(data: bytes) -> bytes | None:
    """Validate ``data`` as a UTF-8 prefix (Unicode Table 3-7: no overlongs, surrogates or
    code points above U+10FFFF) with no C0 control characters; return its incomplete trailing
    sequence (``b""`` if it ends on a character boundary), or None if it is invalid.
    Python's incremental decoder is not used: it buffers e.g. ``b"\\xed\\xb0"`` without
    noticing that no valid character can start that way.
    """
    need, lo, hi, start = 0, 0x80, 0xBF, 0
    for idx, b in enumerate(data):
        if need:
            if not lo <= b <= hi:
                return None
            need, lo, hi = need - 1, 0x80, 0xBF
            continue
        if b < 0x80:
            if b < 0x20:
                return None
            continue
        start = idx
        if 0xC2 <= b <= 0xDF:
            need = 1
        elif b == 0xE0:
            need, lo = 2, 0xA0
        elif b == 0xED:
            need, hi = 2, 0x9F
        elif 0xE1 <= b <= 0xEF:
            need = 2
        elif b == 0xF0:
            need, lo = 3, 0x90
        elif b == 0xF4:
            need, hi = 3, 0x8F
        elif 0xF1 <= b <= 0xF3:
            need = 3
        else:
            return None
    return data[start:] if need else b""
