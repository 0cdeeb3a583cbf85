"""kproxy: a Kubernetes service proxy that programs nftables.

The package is layered: ``model``, ``convert``, ``endpoints``, ``compiler`` and
``plan`` are a pure core; the edges (files, the kernel, the API server, HTTP)
live in their own modules and call into it.
"""

__version__ = "0.1.0"
