#!/usr/bin/env bash
# The local CPU base the image tests build on, where no registry can be reached to pull one:
# Debian bookworm from debootstrap, imported, then Python 3.11 in a venv at /opt/venv (first on
# PATH, as in the PyTorch images), a compiler for DeepSpeed's JIT ops, and this machine's CA
# bundle for pip, which reaches PyPI here only through it. Test-only: the project's Dockerfiles
# carry no CA bundle; they take this image as their BASE build argument.
#   usage: tests/images/cpu_base.sh TAG
set -euo pipefail
tag=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! docker image inspect sftflow-debian:bookworm >/dev/null 2>&1; then
  debootstrap --variant=minbase bookworm "$work/root" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" "$work/root/debootstrap/debootstrap.log" 2>/dev/null; exit 1; }
  rm -rf "$work"/root/var/cache/apt/archives/*.deb "$work"/root/var/lib/apt/lists/*
  tar -C "$work/root" -c . | docker import -c 'CMD ["bash"]' - sftflow-debian:bookworm >/dev/null
  rm -rf "$work/root"
fi

mkdir "$work/ctx"
cp "$(pip config get global.cert 2>/dev/null || echo /etc/ssl/certs/ca-certificates.crt)" "$work/ctx/ca.crt"
cat >"$work/ctx/Dockerfile" <<'EOF'
FROM sftflow-debian:bookworm
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv python3.11-dev g++ ca-certificates procps \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv
COPY ca.crt /etc/ssl/certs/ca-certificates.crt
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
RUN printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\ndisable-pip-version-check = true\n' > /etc/pip.conf
CMD ["python"]
EOF
docker build -q -t "$tag" "$work/ctx" >/dev/null
echo "$tag"
