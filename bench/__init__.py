"""The benchmark behind ``make bench`` and ``docs/benchmarks.md``.

One run measures, side by side on the same machine, the Python gRPC floor, two naive
gateways, a direct vendor call, the LiteLLM proxy and embedgate (its default
configuration and log level; coalescing off; the access log off; all cache hits), all
against the same fast fake vendor, with ``h2load`` as the load generator; then the
embedded default model next to sentence-transformers' own ``encode``.

Modules: ``fake_vendor`` (the vendor), ``servers`` (echo and naive gateways),
``procs`` (pinned child processes and their /proc counters), ``load`` (h2load),
``gateway`` (embedgate as a child process), ``litellm_proxy`` (LiteLLM, installed into
its own virtualenv), ``cases`` (what is measured and how), ``local_model`` (the
embedded model and its reference),
``streams`` (many open StreamEmbed calls), ``decode`` (JSON vs base64 replies),
``profile`` (py-spy), ``environment`` (machine and versions), ``targets``,
``results``, ``report`` and ``plot`` (the outputs), ``run`` (the command).
``analysis.md`` is the hand-written reading of the figures that closes the report;
``notes.toml`` says, by target, why a missed target was missed.

``python -m bench.soak`` (``soak``) is a separate run: RPCs through a model with one
deployment down and the other failing at random (``flaky_vendor``), every vector
checked; ``soak_report`` holds its figures and its section of the report.
"""
