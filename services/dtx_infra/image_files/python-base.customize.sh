#!/bin/sh
# mmdebstrap customize hook of dtx.local/python: Debian's python3.11 laid out the way the
# python:3.11-slim-bookworm image has it, so that the repository's Dockerfile builds on it
# unchanged (its UV_PYTHON is /usr/local/bin/python3.11; its runtime stage uninstalls pip).
# $1 is the root filesystem; the host's CA bundle was uploaded to /tmp/host-ca.crt first.
set -eu
root="$1"

# Commands inside the root get a clean environment: the host's PIP_*/SSL_* settings name
# paths that do not exist there.
in_root() { chroot "$root" env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python3.11"
ln -sf python3.11 "$root/usr/local/bin/python3"
ln -sf python3 "$root/usr/local/bin/python"

# pip and setuptools in /usr/local, as ensurepip puts them in the official image. Debian
# disables ensurepip for the system interpreter, so do what it does: run pip from its own
# wheel, offline, on the wheels python3.11-venv ships. Without the EXTERNALLY-MANAGED
# marker pip installs where the Dockerfile expects it (the official image has none).
rm -f "$root"/usr/lib/python3.11/EXTERNALLY-MANAGED
in_root sh -c 'wheel=$(echo /usr/share/python-wheels/pip-*.whl) && python3.11 "$wheel/pip" install \
  --quiet --no-cache-dir --no-index --disable-pip-version-check --root-user-action=ignore \
  --find-links /usr/share/python-wheels pip setuptools'

# The host's own CAs (on these machines an intercepting proxy's, which PyPI's certificate
# chains up to): those of the host bundle that Debian's lacks become local certificates,
# so that pip and uv in a build on this image reach PyPI through the proxy.
in_root python3.11 - <<'PY'
import pathlib
import re

pem = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def certs(path: str) -> list[str]:
    return pem.findall(pathlib.Path(path).read_text(errors="replace"))


have = {"".join(c.split()) for c in certs("/etc/ssl/certs/ca-certificates.crt")}
extra = [c for c in certs("/tmp/host-ca.crt") if "".join(c.split()) not in have]
for i, cert in enumerate(extra):
    pathlib.Path(f"/usr/local/share/ca-certificates/dtx-host-{i}.crt").write_text(cert + "\n")
print(f"dtx: {len(extra)} CA certificate(s) of the host added")
PY
in_root update-ca-certificates
rm -f "$root/tmp/host-ca.crt"
