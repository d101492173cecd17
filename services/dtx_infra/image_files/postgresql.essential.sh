#!/bin/sh
# mmdebstrap essential hook of dtx.local/postgresql, run before postgresql-15 is installed.
# $1 is the root filesystem.
set -eu
root="$1"

# The chart runs PostgreSQL as uid/gid 999, the official image's postgres user: created
# first, the Debian package finds its system user there and keeps that uid.
grep -q '^postgres:' "$root/etc/group" || echo 'postgres:x:999:' >>"$root/etc/group"
grep -q '^postgres:' "$root/etc/passwd" ||
  echo 'postgres:x:999:999:PostgreSQL administrator:/var/lib/postgresql:/bin/bash' >>"$root/etc/passwd"

# No cluster at install time: the entrypoint initialises $PGDATA on the chart's volume.
mkdir -p "$root/etc/postgresql-common/createcluster.d"
echo 'create_main_cluster = false' >"$root/etc/postgresql-common/createcluster.d/dtx.conf"
