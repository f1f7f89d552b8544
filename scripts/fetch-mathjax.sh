#!/usr/bin/env bash
# Serve MathJax from the site itself, so the book renders its formulas with no network. Fetches the official
# MathJax distribution (the npm package, checked by npm against the registry's integrity hash) and keeps its
# browser bundles (es5/) in book/_assets/mathjax, which the build copies into the site.
# Usage: scripts/fetch-mathjax.sh VERSION DEST
set -euo pipefail
version=$1 dest=$2
if ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "mathjax: installing Debian's npm to fetch MathJax $version"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
  else
    echo "mathjax: npm is needed to fetch MathJax $version (Debian: sudo apt-get install npm), or copy the es5/ folder of the mathjax@$version npm package to $dest" >&2
    exit 2
  fi
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "mathjax@$version" >/dev/null 2>"$tmp/npm.log") || {
  echo "mathjax: npm could not fetch mathjax@$version:" >&2; grep -v 'Unknown user config' "$tmp/npm.log" >&2; exit 2; }
tar -xzf "$tmp"/mathjax-"$version".tgz -C "$tmp" package/es5
rm -rf "$dest.part" && mkdir -p "$(dirname "$dest")"
mv "$tmp/package/es5" "$dest.part"
touch "$dest.part/$version.version"  # the Makefile's target: a new version fetches anew
rm -rf "$dest" && mv "$dest.part" "$dest"
echo "mathjax: $version in $dest ($(du -sh "$dest" | cut -f1))"
