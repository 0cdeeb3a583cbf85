"""The cluster as kproxy knows it: the typed model, conversion from manifests, and the API server edge.

Data flow: ``watch`` (list/watch, the only module that talks to the API
server) and ``manifests`` (files) -> ``convert`` (validation, the one place
raw objects are read) -> ``model`` -> ``tracker`` (what changed since the last
sync). Everything but ``watch`` and ``manifests`` is pure.
"""
