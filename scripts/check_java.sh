#!/usr/bin/env bash
# Stops set-up with one line when Java 17 or newer (TorchServe's frontend) is missing.
version=$(java -version 2>&1 | sed -nE 's/.*version "([0-9]+).*/\1/p' | head -n 1)
if [ -z "$version" ] || [ "$version" -lt 17 ]; then
  echo "tvserve needs Java 17 for TorchServe: install it (Debian/Ubuntu: apt-get install -y openjdk-17-jre-headless) and retry." >&2
  exit 1
fi
if ! command -v javac >/dev/null; then
  echo "tvserve compiles its TorchServe protocol plugin (/v2, /v1) with javac: install a JDK 17 (Debian/Ubuntu: apt-get install -y openjdk-17-jdk-headless) and retry." >&2
  exit 1
fi
