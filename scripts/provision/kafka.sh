#!/usr/bin/env bash
# Kafka broker jars for the tests (Maven Central); needs java and mvn.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/kafka/fetch-jars.sh
