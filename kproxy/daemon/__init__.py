"""The daemon: the sync engine (``proxier``), its loop (``runner``), configuration, and the wiring (``run``)."""
