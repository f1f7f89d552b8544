#!/usr/bin/env bash
# Make Fashion-MNIST available to vaelib.data, offline first.
# 1. Already findable on vaelib's search path ($VAELIB_DATA, /usr/share/datasets, ~/.cache/vaelib, ...)? Done.
# 2. Root with apt-get: install Debian's package dataset-fashion-mnist (60k + 10k images, checksummed by vaelib).
# 3. Otherwise say how to get it and carry on: the chapters that need data then fail with vaelib's clear error.
set -u
py=${1:-python3}
locate() { "$py" -c "from vaelib.data import find_dataset; print(find_dataset('fashion-mnist'))" 2>/dev/null; }
if where=$(locate); then
  echo "data: fashion-mnist found in $where"
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "data: installing Debian package dataset-fashion-mnist"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }
  if where=$(locate); then
    echo "data: fashion-mnist found in $where"
    exit 0
  fi
fi
"$py" -c "from vaelib.data import find_dataset; find_dataset('fashion-mnist')" 2>&1 | tail -n 1 >&2
echo "data: WARNING: continuing without Fashion-MNIST; chapters that need it will fail with the error above." >&2
exit 0
