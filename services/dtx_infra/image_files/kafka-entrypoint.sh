#!/bin/bash
# The entrypoint of dtx.local/kafka (Debian's OpenJDK 17 and Kafka's jars from Maven): the
# conventions of the apache/kafka image that charts/dtx relies on, so that the chart runs
# either image unchanged:
#   - every KAFKA_<NAME> variable (other than the JVM's KAFKA_HEAP_OPTS, KAFKA_OPTS, ...)
#     is the broker setting <name>, lower-cased, with "_" read as ".", "__" as "_" and
#     "___" as "-" (KAFKA_LOG_DIRS -> log.dirs);
#   - the KRaft storage is formatted once with $CLUSTER_ID;
#   - the broker runs in the foreground, logging to stdout.
# It writes server.properties and log4j.properties into $KAFKA_CONFIG_DIR (the chart's
# emptyDir on /opt/kafka/config); with the data, logs and /tmp on volumes too, the root
# filesystem can stay read-only. Arguments, if any, are run instead (a shell, a tool).
set -Eeuo pipefail

KAFKA_HOME=${KAFKA_HOME:-/opt/kafka}
config_dir=${KAFKA_CONFIG_DIR:-$KAFKA_HOME/config}
if [ "$#" -gt 0 ]; then
  exec "$@"
fi

properties() {
  local var key value
  echo "# Written by $0 from the KAFKA_* environment at $(date -u +%FT%TZ)."
  for var in $(compgen -e | LC_ALL=C sort); do
    case "$var" in
      KAFKA_HEAP_OPTS | KAFKA_OPTS | KAFKA_JVM_PERFORMANCE_OPTS | KAFKA_GC_LOG_OPTS | \
        KAFKA_LOG4J_OPTS | KAFKA_JMX_OPTS | KAFKA_DEBUG | KAFKA_HOME | KAFKA_CONFIG_DIR | \
        KAFKA_VERSION) continue ;;
      KAFKA_*) ;;
      *) continue ;;
    esac
    key=${var#KAFKA_}
    key=${key,,}
    key=${key//___/-}
    key=${key//__/%}
    key=${key//_/.}
    key=${key//%/_}
    value=${!var}
    printf '%s=%s\n' "$key" "${value//\\/\\\\}"
  done
}

cat >"$config_dir/log4j.properties" <<'LOG4J'
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.kafka.log.LogCleaner=WARN
log4j.logger.org.apache.kafka.clients=WARN
LOG4J
properties >"$config_dir/server.properties"

classpath="$KAFKA_HOME/libs/*"
log4j="-Dlog4j.configuration=file:$config_dir/log4j.properties"
formatted=true
IFS=, read -ra dirs <<<"${KAFKA_LOG_DIRS:-/tmp/kraft-combined-logs}"
for dir in "${dirs[@]}"; do
  [ -f "$dir/meta.properties" ] || formatted=false
done
if [ "$formatted" = false ]; then
  : "${CLUSTER_ID:?CLUSTER_ID must name the KRaft cluster (kafka-storage.sh random-uuid)}"
  java -Xmx256m "$log4j" -cp "$classpath" kafka.tools.StorageTool format \
    --cluster-id "$CLUSTER_ID" --config "$config_dir/server.properties" --ignore-formatted
fi

# shellcheck disable=SC2086
exec java ${KAFKA_HEAP_OPTS:--Xmx1G -Xms1G} \
  ${KAFKA_JVM_PERFORMANCE_OPTS:--server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true} \
  ${KAFKA_OPTS:-} "$log4j" "-Dkafka.logs.dir=$KAFKA_HOME/logs" \
  -cp "$classpath" kafka.Kafka "$config_dir/server.properties"
