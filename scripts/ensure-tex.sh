#!/usr/bin/env bash
# `make pdf` needs TeX Live with XeLaTeX (the book's Unicode text: β, –, ±), latexmk, the fonts Sphinx's XeLaTeX
# template uses (FreeSerif/FreeSans/FreeMono, Latin Modern Math) and poppler's tools for the PDF's check. As root
# with apt they are installed here, without recommends (32 Debian packages, 81 MB download, 351 MiB installed);
# elsewhere this stops with one line saying what to install.
set -euo pipefail
packages=(texlive-xetex texlive-latex-extra texlive-fonts-recommended latexmk fonts-freefont-otf poppler-utils)
have_all() {
  local tool file
  for tool in xelatex latexmk pdftotext pdfinfo pdfimages fc-list kpsewhich; do
    command -v "$tool" >/dev/null 2>&1 || return 1
  done
  # One file of each package the build reads: latex-extra, xetex, fonts-recommended, fonts-lmodern (a dependency).
  for file in fncychap.sty ucharclasses.sty rsfs10.tfm latinmodern-math.otf; do
    [ -n "$(kpsewhich "$file")" ] || return 1
  done
  [[ "$(fc-list : family)" == *FreeSerif* ]]
}
if have_all; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "pdf: installing Debian's TeX Live for the PDF: ${packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null; }
  have_all && exit 0
fi
echo "pdf: the PDF needs TeX Live with XeLaTeX: sudo apt-get install --no-install-recommends ${packages[*]}" >&2
exit 2
