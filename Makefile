# Shortcuts for ./dev (which does the work: system packages, the virtualenv, then the command).
.PHONY: demo test bench

demo:
	./dev demo

test:
	./dev test

bench:
	./dev bench
