"""``LLM``: the vLLM-compatible offline API.

Code written for vLLM ports by changing the import::

    from blocks import LLM, SamplingParams
    llm = LLM()                               # the embedded default model (or LLM(model="/path/to/hf"))
    outs = llm.generate(["The capital of France is"], SamplingParams(temperature=0.8, top_p=0.95))
    print(outs[0].outputs[0].text)

Prompts may be strings, ``{"prompt": str}``, ``{"prompt_token_ids": [...]}`` or lists of them; one
``SamplingParams`` applies to all, or a list gives one per prompt. ``chat`` renders messages with the
tokenizer's chat template first.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

from blocks.engine.beam import BeamSearchOutput
from blocks.engine.config import EngineConfig
from blocks.engine.core import EngineCore
from blocks.engine.outputs import RequestOutput
from blocks.sample.params import BeamSearchParams, SamplingParams

__all__ = ["LLM"]

PromptType = str | dict[str, Any] | list[int]


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class LLM:
    """An offline engine over one model (vLLM's ``LLM``).

    Args:
        model: a local Hugging Face folder or hub id; ``None`` = the embedded default model.
        All other keyword arguments are :class:`~blocks.engine.config.EngineConfig` fields with
        vLLM's names: ``tokenizer``, ``dtype``, ``tensor_parallel_size``, ``block_size``,
        ``gpu_memory_utilization``, ``kv_cache_memory_bytes``, ``max_model_len``, ``max_num_seqs``,
        ``max_num_batched_tokens``, ``enable_chunked_prefill``, ``enable_prefix_caching``,
        ``kv_cache_dtype``, ``enable_lora``, ``load_format``, ``seed``, ``device``, ``enforce_eager``,
        ``attention_backend``, ``scheduling_policy``, ``max_logprobs``, ``skip_tokenizer_init``,
        ``async_scheduling`` (``None``: on for one CUDA device; see :mod:`blocks.engine.core`).
        An unknown argument raises ``ValueError`` naming it.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - EngineConfig.field_names())
        if unknown:
            raise ValueError(f"unknown LLM argument(s): {', '.join(unknown)}")
        self.config = EngineConfig(model=model, **kwargs)
        if model is None:
            from blocks.default_model_path import default_model_path

            model = default_model_path()
        self.model_path = model
        tokenizer = None
        if not self.config.skip_tokenizer_init:
            tokenizer = _load_tokenizer(self.config.tokenizer or model)
        self.engine = EngineCore(self.config, model, tokenizer)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop tensor-parallel worker processes (also done at interpreter exit)."""
        self.engine.close()

    def get_tokenizer(self):
        return self.engine.tokenizer

    # ------------------------------------------------------------------ prompts
    def _to_token_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, a token id list or a dict, got {type(prompt).__name__}")
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("text prompts need a tokenizer (skip_tokenizer_init=True: pass prompt_token_ids)")
        return prompt, tok.encode(prompt)

    def _add_all(self, add, count: int) -> dict[str, int]:
        """Queue ``count`` requests with ``add(index, request_id)``; if one is refused, the ones already
        queued are aborted before the error propagates (the engine is left as it was)."""
        order: dict[str, int] = {}
        try:
            for i in range(count):
                rid = str(next(self._ids))
                add(i, rid)
                order[rid] = i
        except BaseException:
            for rid in order:
                self.engine.abort_request(rid)
            raise
        return order

    def _encode_all(self, items: list) -> list[tuple[str | None, list[int]]]:
        """Tokenize and validate every prompt before any is queued (a bad one runs nothing)."""
        encoded = []
        for i, item in enumerate(items):
            text, ids = self._to_token_ids(item)
            try:
                self.engine.validate_prompt(ids)
            except ValueError as exc:
                raise ValueError(f"prompt {i}: {exc}") from None
            encoded.append((text, ids))
        return encoded

    @staticmethod
    def _as_list(prompts) -> list:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]
        return list(prompts)

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate completions for ``prompts``; returns one ``RequestOutput`` per prompt, in order.

        Every prompt is validated before any is queued, so a bad prompt raises ``ValueError``
        without running (or leaking) the others.
        """
        items = self._as_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, Sequence) else [sampling_params] * len(items)
        if len(params) != len(items):
            raise ValueError(f"got {len(params)} sampling_params for {len(items)} prompts")
        if priority is not None and len(priority) != len(items):
            raise ValueError(f"got {len(priority)} priorities for {len(items)} prompts")
        encoded = self._encode_all(items)
        order = self._add_all(lambda i, rid: self.engine.add_request(
            rid, encoded[i][1], params[i], prompt=encoded[i][0], priority=0 if priority is None else priority[i]),
            len(encoded))
        return self._run(order, use_tqdm)

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        *,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search over each prompt, inside the engine loop (all prompts' beams batched together).

        Returns one :class:`~blocks.engine.beam.BeamSearchOutput` per prompt (vLLM's shape:
        ``out.sequences[i].tokens`` holds prompt + generated tokens, best hypothesis first).
        Unlike vLLM, ``temperature`` / ``top_k`` / ``top_p`` / ``min_p`` make the beams stochastic.
        """
        encoded = self._encode_all(self._as_list(prompts))
        order = self._add_all(lambda i, rid: self.engine.add_beam_request(rid, encoded[i][1], params), len(encoded))
        return self._run(order, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of ``{"role", "content"}``) or a list of them."""
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init=True)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           chat_template=chat_template)
            prompts.append({"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, order: dict[str, int], use_tqdm: bool) -> list[RequestOutput]:
        results: list[RequestOutput | None] = [None] * len(order)
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(order), desc="Processed prompts", dynamic_ncols=True)
        start = time.perf_counter()
        in_tokens = out_tokens = 0
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if not out.finished or out.request_id not in order:
                        continue
                    results[order[out.request_id]] = out
                    if bar is not None and isinstance(out, RequestOutput):
                        in_tokens += len(out.prompt_token_ids)
                        out_tokens += sum(len(c.token_ids) for c in out.outputs)
                        elapsed = max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix_str(f"input: {in_tokens / elapsed:.1f} toks/s, "
                                            f"output: {out_tokens / elapsed:.1f} toks/s")
                    if bar is not None:
                        bar.update(1)
        except BaseException:
            for rid in order:  # leave the engine clean for the next call (already finished ones: no-op)
                self.engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]
