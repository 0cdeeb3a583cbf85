"""kproxy's benchmarks: scripts that print tables (see README.md here)."""
