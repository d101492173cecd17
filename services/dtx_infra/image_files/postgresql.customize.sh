#!/bin/sh
# mmdebstrap customize hook of dtx.local/postgresql. $1 is the root filesystem; the
# entrypoint was uploaded to /usr/local/bin/docker-entrypoint.sh first.
set -eu
root="$1"

chmod 0755 "$root/usr/local/bin/docker-entrypoint.sh"
# Where the chart mounts its volumes (data, the socket directory, the init scripts): there
# in the image too, writable by any uid as in the official image, for runs without them.
mkdir -p "$root/var/lib/postgresql/data" "$root/run/postgresql" "$root/docker-entrypoint-initdb.d"
chown 999:999 "$root/var/lib/postgresql" "$root/var/lib/postgresql/data" "$root/run/postgresql"
chmod 1777 "$root/var/lib/postgresql/data"
chmod 3777 "$root/run/postgresql"
# A self-signed key made at install time is a secret baked into an image: not shipped.
rm -f "$root/etc/ssl/private/ssl-cert-snakeoil.key" "$root/etc/ssl/certs/ssl-cert-snakeoil.pem"
