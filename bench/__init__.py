"""The benchmark behind ``make bench`` and ``docs/benchmarks.md``.

One run measures, side by side on the same machine, the Python gRPC floor, two naive
gateways, a direct vendor call and embedgate (coalescing off, on, all cache hits), all
against the same fast fake vendor, with ``h2load`` as the load generator.

Modules: ``fake_vendor`` (the vendor), ``servers`` (echo and naive gateways),
``procs`` (pinned child processes and their /proc counters), ``load`` (h2load),
``gateway`` (embedgate as a child process), ``cases`` (what is measured and how),
``streams`` (many open StreamEmbed calls), ``decode`` (JSON vs base64 replies),
``profile`` (py-spy), ``environment`` (machine and versions), ``targets``,
``results``, ``report`` and ``plot`` (the outputs), ``run`` (the command).
``analysis.md`` is the hand-written reading of the figures that closes the report.

``python -m bench.soak`` (``soak``) is a separate run: RPCs through a model with one
deployment down and the other failing at random (``flaky_vendor``), every vector
checked; ``soak_report`` holds its figures and its section of the report.
"""
