# kproxy's image, built offline. `./dev image` (image/build.py) makes its two
# inputs on the host, then builds this file with podman in a network namespace
# of its own, so the build has no network at all:
#
#   BASE          localhost/kproxy-base:<hash>, a Debian 12 root filesystem made
#                 by mmdebstrap from Debian's packages: the essential set plus
#                 python3 and libnftables1 (image/debian.in, versions recorded in
#                 image/debian.lock). No apt, no shell tools beyond Debian's
#                 essential set.
#   dist/wheels/  kproxy's wheel, the wheels pinned in image/requirements.lock
#                 and pip's own wheel, all downloaded or built and hash-checked
#                 on the host.
#
# The image runs as root (it needs NET_ADMIN in the host network namespace;
# daemonset.yaml drops every other capability) with a read-only root
# filesystem: bytecode is compiled at install, and /tmp is an emptyDir.
ARG BASE

FROM ${BASE} AS build
ARG SOURCE_DATE_EPOCH
COPY image/requirements.lock dist/wheels/ /src/
# pip runs from its own wheel: the image itself carries no pip.
# --require-hashes: every wheel must match a hash in the lock (kproxy's own
# wheel: the hash in kproxy.txt, which image/build.py writes when it builds it).
RUN set -- /src/pip-*-py3-none-any.whl \
    && python3 -m venv --without-pip /opt/kproxy \
    && /opt/kproxy/bin/python "$1/pip" install --no-index --find-links=/src \
        --only-binary=:all: --require-hashes --no-cache-dir --disable-pip-version-check \
        --root-user-action=ignore -r /src/requirements.lock -r /src/kproxy.txt

FROM ${BASE}
ARG VERSION
LABEL org.opencontainers.image.title="kproxy" \
      org.opencontainers.image.description="A Kubernetes service proxy built on nftables" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/kproxy /opt/kproxy
ENV PATH=/opt/kproxy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["kproxy"]
