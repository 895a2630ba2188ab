#!/usr/bin/env bash
# ElasticMQ (an SQS-compatible server, org.elasticmq:elasticmq-server_2.13) for the SQS uplink
# tests: its jars from Maven Central into .cache/elasticmq-jars (or $ELASTICMQ_JARS_DIR),
# through Maven's ordinary resolution (scripts/sqs/pom.xml). The other SQS test server, moto,
# comes with the Python `test` extra. Needs a JDK (17+) and Maven.
#
# Idempotent: a stamp file records the version; nothing is downloaded when it matches.
#   ELASTICMQ_VERSION=1.6.11 bash scripts/provision/sqs.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

version="${ELASTICMQ_VERSION:-1.6.11}"
dest="${ELASTICMQ_JARS_DIR:-$PWD/.cache/elasticmq-jars}"
stamp="$dest/.elasticmq-version"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$version" ]] \
    && ls "$dest"/elasticmq-server_2.13-*.jar >/dev/null 2>&1; then
  echo "elasticmq $version jars already in $dest"
  exit 0
fi

if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then
  source scripts/_setup_common.sh
  command -v java >/dev/null || install_debian openjdk-17-jre-headless
  command -v mvn >/dev/null || install_debian maven
fi

tmp="$dest.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT

mvn -q -B -f scripts/sqs/pom.xml -Delasticmq.version="$version" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp"

echo "$version" > "$tmp/.elasticmq-version"
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$tmp" "$dest"
trap - EXIT
echo "elasticmq $version: $(ls "$dest"/*.jar | wc -l) jars in $dest"
