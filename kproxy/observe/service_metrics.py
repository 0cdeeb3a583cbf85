"""The choices of ``--service-metrics``: which Services export per-Service series.

A module of its own, without prometheus_client, so that the command line and
the config file can name the choices without loading the metrics machinery
(modes other than the daemon never serve metrics).
"""

SERVICE_METRICS: tuple[str, ...] = ("none", "annotated", "all")
"""``--service-metrics``: which Services export ``kproxy_service_new_connections_total``.

``annotated`` (the default): those annotated ``kproxy.io/metrics: "true"``;
``all``: every Service; ``none``: no Service. ``kproxy_rate_limit_drops_total``
and ``kproxy_limit_drops_total`` are exported for every Service with a limit,
whatever the setting (the limit's annotation opts it in).
"""
DEFAULT_SERVICE_METRICS = "annotated"
