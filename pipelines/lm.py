"""A causal LM ready for evaluation and serving: base model (+ LoRA adapter), batched
greedy/sampled generation, continuous batching, and per-example likelihood of reference
completions.

One class serves the `evaluate` stage, the MLflow pyfunc model (`pipelines/packaging.py`)
and the HTTP service, so every consumer generates with the same code and decoding rules:
`CausalLM.generate_ids` runs one static batch through transformers' `generate` (evaluation,
the pyfunc model); `ContinuousBatch` decodes rows that join and leave between steps over one
KV cache (the HTTP service's worker, `CausalLM.generate_continuous` in-process).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import LLMOpsError

logger = logging.getLogger(__name__)

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass(frozen=True)
class Decoding:
    """Generation settings (greedy by default, so runs are deterministic)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                                  "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:  # silence transformers' warnings about sampling knobs under greedy decoding
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class Generation:
    texts: list[str]
    new_tokens: list[int]
    seconds: float
    batches: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return sum(self.new_tokens) / self.seconds if self.seconds > 0 else 0.0


class AdapterMismatch(LLMOpsError):
    """The adapter was trained for another base model or does not load onto it."""


# Fewer shared leading tokens than this and a prefill starts from scratch (and remembers the
# new prompt instead): a short match is more likely a coincidence than a shared system prompt.
MIN_REUSED_PREFIX = 8


class ContextTooLong(LLMOpsError):
    """A prompt and the tokens asked for do not fit the model's context window."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context: int) -> None:
        super().__init__(f"the prompt is {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for: "
                         f"{prompt_tokens + max_new_tokens} in all, over the model's context of {context} tokens; "
                         "shorten the prompt or ask for fewer tokens")
        self.prompt_tokens, self.max_new_tokens, self.context = prompt_tokens, max_new_tokens, context


class CausalLM:
    """A tokenizer and a causal LM (optionally with a LoRA adapter merged in)."""

    def __init__(self, model: Any, tokenizer: Any, name: str = "model") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.tokenizer.padding_side = "left"  # batched generation continues every prompt at the right edge
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def load(cls, base_dir: Path | str, adapter_dir: Path | str | None = None, *, dtype: str = "bfloat16",
             name: str = "model") -> CausalLM:
        """Load a transformers folder, and a peft adapter onto it (merged for faster inference)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base_dir = Path(base_dir)
        if not (base_dir / "config.json").exists():
            raise LLMOpsError(f"{base_dir} is not a model folder (no config.json); run `llmops base_model` first")
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir if adapter_dir and _has_tokenizer(adapter_dir)
                                                  else base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, DTYPES[dtype]))
        if adapter_dir is not None:
            model = _attach_adapter(model, Path(adapter_dir), base_dir)
        model.eval()
        # Measured with torch 2.13 on this CPU: in bfloat16, a forward whose output layer's weight
        # does not require grad (peft leaves the merged model frozen) runs that layer as a bmm over
        # a copy of the weight (49k x 576 for SmolLM2, every forward): 96 vs 43 ms for a 14-token
        # prefill (benchmarks/RESULTS.md, Serving). Every forward here runs under
        # torch.inference_mode, where a weight that requires grad records nothing.
        model.requires_grad_(True)
        return cls(model, tokenizer, name)

    @property
    def context_limit(self) -> int | None:
        """Positions the model was trained for (prompt + answer), when its config says."""
        config = self.model.config.get_text_config(decoder=True)
        return getattr(config, "max_position_embeddings", None)

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise ContextTooLong when a prompt and its answer would run past the context window."""
        context = self.context_limit
        if context is not None and prompt_tokens + max_new_tokens > context:
            raise ContextTooLong(prompt_tokens, max_new_tokens, context)

    def generate_continuous(self, prompt_texts: list[str], decoding: Decoding, *, max_rows: int = 16,
                            max_new_tokens: list[int] | None = None,
                            batch: ContinuousBatch | None = None) -> list[list[int]]:
        """Every prompt through one `ContinuousBatch` of up to `max_rows` rows: a finished row's
        slot goes to the next waiting prompt at once (prompts that wait are prefilled together).
        Returns the new token ids of each row, as `generate_ids` does. Sampled rows use
        `decoding.seed + i` for prompt i. Pass an empty `batch` to read its counters afterwards."""
        return [row.tokens for row in self.decode_continuous(prompt_texts, decoding, max_rows=max_rows,
                                                              max_new_tokens=max_new_tokens, batch=batch)]

    def decode_continuous(self, prompt_texts: list[str], decoding: Decoding, *, max_rows: int = 16,
                          max_new_tokens: list[int] | None = None,
                          batch: ContinuousBatch | None = None) -> list[Sequence]:
        """`generate_continuous`, returning each prompt's finished `Sequence` (its tokens, finish
        reason and `seconds` from its prefill to its last token)."""
        limits = list(max_new_tokens) if max_new_tokens else [decoding.max_new_tokens] * len(prompt_texts)
        ids = self.tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
        waiting = [Sequence(row, limit, replace(decoding, seed=decoding.seed + i))
                   for i, (row, limit) in enumerate(zip(ids, limits))]
        rows = list(waiting)
        batch = batch or ContinuousBatch(self, max_rows)
        while waiting or batch.rows:
            if waiting and batch.free:
                newcomers, waiting = waiting[: batch.free], waiting[batch.free:]
                batch.add(newcomers)
            batch.step()
        for row in rows:
            if row.error is not None:
                raise row.error
        return rows

    def generate(self, prompt_texts: list[str], decoding: Decoding, batch_size: int = 16) -> Generation:
        """Continue each already-formatted prompt; returns the new text (special tokens removed)."""
        texts: list[str] = []
        counts: list[int] = []
        start = time.perf_counter()
        batches = 0
        for offset in range(0, len(prompt_texts), batch_size):
            chunk = prompt_texts[offset: offset + batch_size]
            for row in self.generate_ids(chunk, decoding, seed=decoding.seed + offset):
                counts.append(len(row))
                texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
            batches += 1
        return Generation(texts, counts, time.perf_counter() - start, batches)

    def generate_ids(self, prompt_texts: list[str], decoding: Decoding, *, max_new_tokens: list[int] | None = None,
                     on_step: Callable[[list[int]], None] | None = None, stop_rows: list[bool] | None = None,
                     seed: int | None = None) -> list[list[int]]:
        """One batched `generate` call; the new token ids of each row (up to and including EOS).

        `max_new_tokens` gives each row its own limit (the HTTP service batches requests with
        different `max_tokens`); `on_step` receives each decoding step's token per row (for
        streaming); setting `stop_rows[i] = True` from `on_step` ends row i early (a stop
        sequence was hit or the client went away). A row that is done stops costing compute
        only when every row is done: that is how `generate` batches.
        """
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        limits = list(max_new_tokens) if max_new_tokens else [decoding.max_new_tokens] * len(prompt_texts)
        eos = self.tokenizer.eos_token_id
        encoded = self.tokenizer(prompt_texts, return_tensors="pt", padding=True, add_special_tokens=False)
        prompt_length = encoded["input_ids"].shape[1]
        stopped = stop_rows if stop_rows is not None else [False] * len(prompt_texts)

        # transformers' extension points: a stopping criterion that answers per row, and a
        # streamer that sees every step's tokens (the first call carries the prompt ids).
        class RowLimits(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):  # noqa: ANN001, ANN003
                generated = input_ids.shape[1] - prompt_length
                done = [generated >= limit or stop for limit, stop in zip(limits, stopped)]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        class StepStreamer(BaseStreamer):
            first = True

            def put(self, value):  # noqa: ANN001
                if self.first:
                    self.first = False
                    return
                on_step(value.reshape(-1).tolist())

            def end(self) -> None:
                pass

        kwargs = decoding.generate_kwargs()
        kwargs["max_new_tokens"] = max(limits)
        # Control tokens other than EOS (a chat template's <|im_start|>, padding, ...) are never
        # part of an answer: a model that emits one would break the template it is served in.
        suppressed = sorted(set(self.tokenizer.all_special_ids) - {eos})
        if suppressed:
            kwargs["suppress_tokens"] = suppressed
        if decoding.do_sample:
            torch.manual_seed(decoding.seed if seed is None else seed)
        with torch.inference_mode():
            output = self.model.generate(**encoded, **kwargs, eos_token_id=eos,
                                         pad_token_id=self.tokenizer.pad_token_id,
                                         stopping_criteria=StoppingCriteriaList([RowLimits()]),
                                         streamer=StepStreamer() if on_step else None)
        rows = []
        for row, limit in zip(output[:, prompt_length:].tolist(), limits):
            row = row[:limit]
            if eos is not None and eos in row:
                row = row[: row.index(eos) + 1]
            rows.append(row)
        return rows

    def score(self, prompt_texts: list[str], completion_texts: list[str], max_length: int = 512,
              batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """Summed NLL of each completion given its prompt, and its token count (prompt masked)."""
        import torch

        from pipelines.train import IGNORE_INDEX, collate, encode_pair

        nll = np.zeros(len(prompt_texts))
        counts = np.zeros(len(prompt_texts), dtype=int)
        pad = self.tokenizer.pad_token_id
        for offset in range(0, len(prompt_texts), batch_size):
            examples = []
            for prompt, completion in zip(prompt_texts[offset: offset + batch_size],
                                          completion_texts[offset: offset + batch_size]):
                example = encode_pair(prompt, completion, self.tokenizer, max_length)
                if example is None:
                    raise LLMOpsError(f"an example leaves no completion token within {max_length} tokens; "
                                      "raise evaluate.max_length")
                examples.append(example)
            batch = collate(examples, pad)
            with torch.inference_mode():
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            mask = labels != IGNORE_INDEX
            picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            nll[offset: offset + len(examples)] = (-(picked * mask)).sum(-1).numpy()
            counts[offset: offset + len(examples)] = mask.sum(-1).numpy()
        return nll, counts


@dataclass(eq=False)
class Sequence:
    """One prompt being answered inside a `ContinuousBatch`.

    `tokens` grows by one id per step (EOS included when it comes). The batch finishes a row
    on EOS ("stop") or at `max_new_tokens` ("length"); the caller finishes it with `finish()`
    (a stop sequence, a client that left). A finished row leaves the cache at the next step.
    """

    prompt_ids: list[int]
    max_new_tokens: int
    decoding: Decoding = field(default_factory=Decoding)
    tag: Any = None  # the caller's object for this row (the server's request)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: Exception | None = None  # set when the batch refused the row
    processors: Any = field(default=None, repr=False)
    generator: Any = field(default=None, repr=False)
    joined_at: float | None = None  # time.perf_counter() when its prefill began
    finished_at: float | None = None  # ... and when it finished

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def seconds(self) -> float | None:
        """From the start of its prefill to its last token: its latency inside the batch."""
        if self.joined_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.joined_at

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.finished_at = time.perf_counter()


class ContinuousBatch:
    """Continuous batching: rows decode together over one KV cache, and join or leave between
    steps, so a finished row's slot is refilled instead of idling until the longest answer of a
    static batch ends.

    Why a loop of our own over the model's forward: a CPU decoding step costs about the same for
    1 or 16 rows (it is bound by reading the weights), so the rows a static `generate` batch keeps
    alive after they finished are pure waste (answers here average ~12 tokens of a 48-token
    budget); and transformers' own continuous-batching manager (`generate_batch`, paged cache)
    ran at 0.62x the tokens/s of static batches on this CPU (benchmarks/RESULTS.md, Serving).
    What stays the library's: the model's forward and its `DynamicCache`, and transformers'
    logits processors for repetition penalty, token suppression, temperature and top-p, in the
    order `generate` applies them. This class only schedules rows.

    Layout: one `DynamicCache` of shape (rows, kv heads, columns, head dim) per layer with the
    rows left-padded, a 2-D attention mask over the cache columns, each row's next position
    (its own count of real tokens) and its pending token (chosen, not yet in the cache). Per
    step: drop finished rows (`batch_select_indices`), trim leading columns that are padding in
    every row, run the forward on the pending tokens, pick each row's next token. Newcomers are
    prefilled together in a cache of their own (which starts from the remembered prefix's
    keys/values when they all begin with it), then merged: the shorter side is padded on the
    left so the column counts match. Greedy rows give what `generate` gives for the prompt alone.
    """

    def __init__(self, lm: CausalLM, max_rows: int, *, reuse_prefix: bool = True) -> None:
        from transformers import SuppressTokensLogitsProcessor

        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.lm = lm
        self.max_rows = max_rows
        # Prefix reuse: the keys/values of the last prompt prefilled without reuse. Requests to one
        # served model share their start (chat template and system prompt: 27 of ~39 tokens for
        # the demo's prompts), whose keys/values are the same in every row (same tokens, same
        # positions), so newcomers that start with it prefill only the rest of their prompt.
        self.reuse_prefix = reuse_prefix
        self.prefix_ids: list[int] = []
        self.prefix_kv: list[tuple[Any, Any]] = []
        self.rows: list[Sequence] = []
        self.eos = lm.tokenizer.eos_token_id
        # Control tokens other than EOS (a chat template's <|im_start|>, padding, ...) are never
        # part of an answer, as in `generate_ids`.
        suppressed = sorted(set(lm.tokenizer.all_special_ids) - {self.eos})
        self.suppress = SuppressTokensLogitsProcessor(suppressed, device=lm.model.device) if suppressed else None
        # Sampling keeps the top_k most likely tokens, as `generate` does: the model's generation
        # config, else transformers' default of 50 (which `Decoding` leaves in place).
        top_k = getattr(lm.model.generation_config, "top_k", None)
        self.top_k = 50 if top_k is None else top_k
        self.cache: Any = None
        self.mask: Any = None  # (rows, columns) 1 where the cache column holds a real token of the row
        self.positions: Any = None  # (rows,) position of each row's pending token
        self.pending: Any = None  # (rows,) each row's chosen token, not yet in the cache
        # counters: decoding steps, rows in them and their seconds; prefills, prompts and seconds
        self.steps, self.rows_stepped, self.step_seconds = 0, 0, 0.0
        self.prefills, self.prompts_prefilled, self.prefill_seconds = 0, 0, 0.0
        self.prefix_tokens_reused = 0

    @property
    def free(self) -> int:
        return self.max_rows - sum(not row.finished for row in self.rows)

    @property
    def columns(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def add(self, sequences: list[Sequence]) -> list[tuple[Sequence, int]]:
        """Prefill the newcomers together, choose their first token and merge them into the
        running rows. A newcomer that cannot run (prompt + max_new_tokens past the context) comes
        back finished with `error` set; the others are not affected. Returns (row, first token)."""
        import torch

        admitted = []
        for row in sequences:
            try:
                if not row.prompt_ids:
                    raise LLMOpsError("an empty prompt has nothing to continue; send some text")
                self.lm.check_fits(len(row.prompt_ids), row.max_new_tokens)
            except LLMOpsError as error:
                row.error = error
                row.finish("error")
                continue
            admitted.append(row)
        if not admitted:
            return []
        self._drop_finished()
        if len(admitted) > self.free:
            raise ValueError(f"{len(admitted)} newcomers for {self.free} free rows")
        for row in admitted:
            self._prepare(row)
        device = self.lm.model.device
        reused = self._reusable_prefix(admitted)
        cache = self._new_cache()
        for index, (keys, values) in enumerate(self.prefix_kv if reused else []):
            cache.update(keys[:, :, :reused].expand(len(admitted), -1, -1, -1),
                         values[:, :, :reused].expand(len(admitted), -1, -1, -1), index)
        suffixes = [row.prompt_ids[reused:] for row in admitted]
        width = max(map(len, suffixes))
        pad = self.lm.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in suffixes], device=device)
        fresh = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in suffixes], device=device)
        # the 2-D mask covers the reused prefix and the new tokens: [prefix][padding][rest of the prompt]
        mask = torch.cat([torch.ones(len(admitted), reused, dtype=fresh.dtype, device=device), fresh], dim=1)
        positions = reused + (fresh.cumsum(-1) - 1).clamp(min=0)
        started = time.perf_counter()
        for row in admitted:
            row.joined_at = started
        with torch.inference_mode():
            output = self.lm.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                                   use_cache=True, logits_to_keep=1)
        _check_layers(cache)
        tokens = self._choose(output.logits[:, -1], admitted)
        if not reused and self.reuse_prefix:
            self._remember_prefix(admitted[0], cache)
        # Everything above is the newcomers' own; the running rows change only from here on.
        self._merge(admitted, cache, mask, mask.sum(-1), torch.tensor(tokens, device=device))
        self.prefills += 1
        self.prompts_prefilled += len(admitted)
        self.prefix_tokens_reused += reused * len(admitted)
        self.prefill_seconds += time.perf_counter() - started
        return list(zip(admitted, tokens))

    def _reusable_prefix(self, rows: list[Sequence]) -> int:
        """How many leading prompt tokens every newcomer shares with the remembered prompt (0
        below MIN_REUSED_PREFIX). At least one token of each prompt is left to prefill: its
        logits choose the first answer token."""
        if not self.reuse_prefix or not self.prefix_ids:
            return 0
        shared = min(min(_common_prefix(self.prefix_ids, row.prompt_ids), len(row.prompt_ids) - 1) for row in rows)
        return shared if shared >= MIN_REUSED_PREFIX else 0

    def _remember_prefix(self, row: Sequence, cache: Any) -> None:
        """Keep the keys/values of this prompt (row 0 of a fresh prefill, its last columns)."""
        length = len(row.prompt_ids)
        self.prefix_ids = list(row.prompt_ids)
        self.prefix_kv = [(layer.keys[:1, :, -length:].clone(), layer.values[:1, :, -length:].clone())
                          for layer in cache.layers]

    def step(self) -> list[tuple[Sequence, int]]:
        """One decoding step for every unfinished row; returns (row, next token)."""
        import torch

        self._drop_finished()
        if not self.rows:
            return []
        device = self.lm.model.device
        started = time.perf_counter()
        mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=self.mask.dtype, device=device)], dim=1)
        with torch.inference_mode():
            output = self.lm.model(input_ids=self.pending[:, None], attention_mask=mask,
                                   position_ids=self.positions[:, None], cache=self.cache, use_cache=True,
                                   logits_to_keep=1)
        self.mask = mask
        self.positions = self.positions + 1
        tokens = self._choose(output.logits[:, -1], self.rows)
        self.pending = torch.tensor(tokens, device=device)
        self.steps += 1
        self.rows_stepped += len(tokens)
        self.step_seconds += time.perf_counter() - started
        return list(zip(self.rows, tokens))

    def _prepare(self, row: Sequence) -> None:
        """The transformers logits processors `generate` would build for this row's decoding."""
        import torch
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        d = row.decoding
        processors = LogitsProcessorList()
        if d.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(d.repetition_penalty))
        # (token suppression comes next in `generate`; `_choose` applies it to all rows at once)
        if d.do_sample:
            if d.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(d.temperature))
            if self.top_k:
                processors.append(TopKLogitsWarper(self.top_k))
            if d.top_p < 1.0:
                processors.append(TopPLogitsWarper(d.top_p))
            # A generator per row: a seeded request samples the same answer whatever rows share its batch.
            row.generator = torch.Generator(device=self.lm.model.device).manual_seed(d.seed)
        row.processors = processors

    def _choose(self, logits: Any, rows: list[Sequence]) -> list[int]:
        """Each row's next token from its own processed scores; finishes rows on EOS or length."""
        import torch

        scores = logits.to(dtype=torch.float32, copy=True)
        if self.suppress is not None:
            # Before the per-row processors, for all rows in one call: a suppressed token's score
            # is -inf, which a repetition penalty leaves at -inf, so the order changes nothing.
            scores = self.suppress(torch.empty(0, dtype=torch.long), scores)
        sampled = {}
        for index, row in enumerate(rows):
            if not row.processors and not row.decoding.do_sample:
                continue  # plain greedy: the batched argmax below
            row_scores = scores[index: index + 1]
            if row.processors:
                seen = torch.tensor([row.prompt_ids + row.tokens], device=scores.device)
                row_scores = row.processors(seen, row_scores)
                scores[index] = row_scores[0]
            if row.decoding.do_sample:
                probs = torch.nn.functional.softmax(row_scores, dim=-1)
                sampled[index] = int(torch.multinomial(probs, num_samples=1, generator=row.generator)[0, 0])
        tokens = torch.argmax(scores, dim=-1).tolist()
        for index, row in enumerate(rows):
            token = tokens[index] = sampled.get(index, tokens[index])
            row.tokens.append(token)
            if token == self.eos:
                row.finish("stop")
            elif len(row.tokens) >= row.max_new_tokens:
                row.finish("length")
        return tokens

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.lm.model.config)

    def _drop_finished(self) -> None:
        """Evict finished rows from the cache, then the leading columns no remaining row uses."""
        import torch

        keep = [i for i, row in enumerate(self.rows) if not row.finished]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask, self.positions, self.pending = [], None, None, None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.positions, self.pending = self.mask[index], self.positions[index], self.pending[index]
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else self.columns
        if first > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]

    def _merge(self, rows: list[Sequence], cache: Any, mask: Any, positions: Any, pending: Any) -> None:
        """Append prefilled rows to the running ones, left-padding the side with fewer columns."""
        import torch

        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.pending = list(rows), cache, mask, positions, pending
            return
        running, joining = self.columns, int(mask.shape[1])
        if running > joining:
            _pad_left(cache, running - joining)
            mask = torch.nn.functional.pad(mask, (running - joining, 0))
        elif joining > running:
            _pad_left(self.cache, joining - running)
            self.mask = torch.nn.functional.pad(self.mask, (joining - running, 0))
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)
        self.rows += rows
        self.mask = torch.cat([self.mask, mask], dim=0)
        self.positions = torch.cat([self.positions, positions], dim=0)
        self.pending = torch.cat([self.pending, pending], dim=0)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _pad_left(cache: Any, columns: int) -> None:
    import torch

    for layer in cache.layers:
        layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, columns, 0))
        layer.values = torch.nn.functional.pad(layer.values, (0, 0, columns, 0))


def _check_layers(cache: Any) -> None:
    """Merging and trimming edit each layer's keys/values along the column axis: only plain
    full-attention layers (`DynamicLayer`) keep every column there."""
    from transformers.cache_utils import DynamicLayer

    odd = {type(layer).__name__ for layer in cache.layers
           if type(layer) is not DynamicLayer or not layer.is_initialized}
    if odd:
        raise LLMOpsError(f"continuous batching needs full attention in every layer; this model's cache has "
                          f"{', '.join(sorted(odd))} layers (sliding-window, linear or shared); serve it with "
                          "static batches (`CausalLM.generate_ids`)")


def _has_tokenizer(folder: Path | str) -> bool:
    return any((Path(folder) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))


def _attach_adapter(model: Any, adapter_dir: Path, base_dir: Path) -> Any:
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").exists():
        raise LLMOpsError(f"no trained adapter in {adapter_dir} (adapter_config.json missing); "
                          "run `llmops train` first")
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as error:
        raise AdapterMismatch(
            f"the adapter in {adapter_dir} does not fit the base model in {base_dir}: "
            f"{str(error).splitlines()[0][:300]}; train the adapter on this base model or point "
            "base_model.source at the model it was trained on"
        ) from None
    return peft_model.merge_and_unload()
