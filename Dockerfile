# kproxy's image: Debian 12 (nft 1.0.6, the version the benchmarks ran on), the
# same Debian packages ./dev installs for running kproxy, and kproxy installed
# (not editable) into a virtualenv. daemonset.yaml runs it.
FROM debian:12-slim

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        nftables libnftables1 conntrack python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# Only what building the wheel needs (.dockerignore keeps the rest out).
COPY pyproject.toml README.md /src/
COPY rules/ /src/rules/
COPY kproxy/ /src/kproxy/
RUN python3 -m venv /opt/kproxy \
    && /opt/kproxy/bin/pip install --no-cache-dir /src \
    && rm -rf /src

# The root filesystem is read-only at run time: bytecode was compiled at install.
ENV PATH=/opt/kproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["kproxy"]
