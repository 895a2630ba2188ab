#!/usr/bin/env bash
# Puts the jars of a single-node Apache Kafka broker into a cache directory.
#
#   bash scripts/kafka/fetch-jars.sh            # -> .cache/kafka-jars
#   KAFKA_JARS_DIR=/opt/kafka-jars KAFKA_VERSION=3.9.0 bash scripts/kafka/fetch-jars.sh
#
# Idempotent: when the directory already holds the jars of this version (a stamp file
# records it) nothing is downloaded. Needs a JDK (17+) and Maven; the jars come from
# Maven Central through Maven's ordinary resolution (and its ~/.m2 cache).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
version="${KAFKA_VERSION:-3.9.1}"
dest="${KAFKA_JARS_DIR:-$repo/.cache/kafka-jars}"
stamp="$dest/.kafka-version"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$version" ]] && ls "$dest"/kafka_2.13-*.jar >/dev/null 2>&1; then
  echo "kafka $version jars already in $dest"
  exit 0
fi

command -v mvn >/dev/null || { echo "mvn not found: apt-get install maven" >&2; exit 1; }
command -v java >/dev/null || { echo "java not found: apt-get install openjdk-17-jre-headless" >&2; exit 1; }

tmp="$dest.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT

mvn -q -B -f "$here/pom.xml" -Dkafka.version="$version" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp"

echo "$version" > "$tmp/.kafka-version"
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$tmp" "$dest"
trap - EXIT
echo "kafka $version: $(ls "$dest"/*.jar | wc -l) jars in $dest"
