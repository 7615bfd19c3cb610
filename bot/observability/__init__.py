"""Operating the bot: Prometheus metrics (:mod:`.metrics`), the current numbers they read
(:mod:`.status`) and structured logs with a request id (:mod:`.structured_logs`).

Import the submodules themselves: the pipeline imports :mod:`.structured_logs` alone, without
``prometheus_client``.
"""
