#!/usr/bin/env bash
# Build the Debian package fwsafe_VERSION_all.deb with the standard tooling (debian/,
# dpkg-buildpackage -us -uc -b, dh-python/pybuild), then check it with lintian: an error fails
# the build, warnings are listed.
#
#   bash scripts/build-deb.sh [OUTDIR]      the .deb and its lintian report go to OUTDIR
#                                           (default: dist/ in this checkout)
#
# Missing build dependencies are installed with apt (as root; service starts are denied while
# apt runs, as in scripts/setup.sh). The build runs in a temporary copy of the tree (the files
# git knows plus new ones it does not ignore), so nothing but OUTDIR is written into the
# checkout: dpkg-buildpackage leaves its results next to the source directory.
# One line per step; the full output goes to OUTDIR/build-deb.log, shown on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${1:-dist}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/build-deb.log"
: > "$LOG"
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

NAME=build-deb.sh
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

packages=(dpkg-dev debhelper dh-python python3-all python3-setuptools pybuild-plugin-pyproject
          python3-click lintian fakeroot)
mapfile -t missing < <(missing_packages "${packages[@]}")


if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "build-deb.sh: missing build dependencies ${missing[*]}: run as root (or with sudo)" >&2
        exit 2
    fi
    step "apt-get install ${missing[*]}" install_packages "${missing[@]}"
else
    echo "build-deb.sh: build dependencies ... already installed"
fi

# One version everywhere: pyproject.toml, fwsafe/__init__.py, debian/changelog.
py_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
init_version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' fwsafe/__init__.py)
deb_version=$(dpkg-parsechangelog -S Version)
if [ "$py_version" != "$init_version" ] || [ "$py_version" != "${deb_version%%-*}" ]; then
    echo "build-deb.sh: versions differ: pyproject.toml $py_version, fwsafe/__init__.py" \
         "$init_version, debian/changelog $deb_version (add a changelog entry: dch -v)" >&2
    exit 2
fi
DEB="fwsafe_${deb_version}_all.deb"

WORK=$(mktemp -d /tmp/fwsafe-build-deb.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
SRC="$WORK/fwsafe-$py_version"
mkdir "$SRC"

copy_tree() {
    if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git -C "$REPO" ls-files -z --cached --others --exclude-standard \
            | (cd "$REPO" && while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done) \
            | (cd "$REPO" && tar --null -T - -cf -) | tar -C "$SRC" -xf -
    else  # an unpacked tarball: everything but the usual droppings
        tar -C "$REPO" --exclude=.venv --exclude=.git --exclude=dist --exclude=build \
            --exclude='*.egg-info' --exclude=__pycache__ --exclude='.*_cache' -cf - . \
            | tar -C "$SRC" -xf -
    fi
    test -f "$SRC/debian/control"
}
step "copy the tree to $SRC" copy_tree
# The distribution's python3 and tools only: no virtualenv, pyenv or PYTHONPATH of the caller.
step "dpkg-buildpackage -us -uc -b" env -i -C "$SRC" PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    HOME="$WORK" LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive dpkg-buildpackage -us -uc -b
cp "$WORK/$DEB" "$OUT/$DEB"

# lintian: errors fail the build; the full report (warnings, info) is kept beside the .deb.
REPORT="$OUT/${DEB%.deb}.lintian.txt"
rc=0
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$WORK" LC_ALL=C.UTF-8 \
    lintian --fail-on error --info --display-info "$OUT/$DEB" > "$REPORT" 2>&1 || rc=$?
errors=$(grep -c '^E: ' "$REPORT" || true)
warnings=$(grep -c '^W: ' "$REPORT" || true)
echo "build-deb.sh: lintian: $errors error(s), $warnings warning(s) (report: $REPORT)"
grep -E '^(E|W): ' "$REPORT" | sed 's/^/    /' || true
if [ "$rc" != 0 ]; then
    echo "build-deb.sh: lintian failed (exit $rc)" >&2
    cat "$REPORT" >&2
    exit 1
fi
echo "build-deb.sh: built $OUT/$DEB"
