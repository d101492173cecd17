#!/bin/sh
# mmdebstrap customize hook of dtx.local/kafka. $1 is the root filesystem; the broker's
# jars were copied to /opt/kafka/libs and the entrypoint to /usr/local/bin first.
set -eu
root="$1"

# The chart runs the broker as uid/gid 1000, the apache/kafka image's appuser.
grep -q '^appuser:' "$root/etc/group" || echo 'appuser:x:1000:' >>"$root/etc/group"
grep -q '^appuser:' "$root/etc/passwd" ||
  echo 'appuser:x:1000:1000:Kafka:/opt/kafka:/usr/sbin/nologin' >>"$root/etc/passwd"

chmod 0755 "$root/usr/local/bin/kafka-entrypoint.sh"
chmod -R a+rX "$root/opt/kafka/libs"
# Where the chart mounts its volumes (configuration, logs, data): there in the image too.
mkdir -p "$root/opt/kafka/config" "$root/opt/kafka/logs" "$root/var/lib/kafka/data"
chown 1000:1000 "$root/opt/kafka/config" "$root/opt/kafka/logs" "$root/var/lib/kafka/data"
