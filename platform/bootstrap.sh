#!/usr/bin/env bash
# Create or refresh evp's virtual environment. Safe to run any number of times.
#
# The venv lives in the cache (not the clone), keyed by a hash of pyproject.toml's dependencies, so
# clones with the same dependencies share one install and a dependency change gets a
# fresh venv instead of an upgrade in place. The first run installs everything (torch
# included: minutes); later runs only re-point the editable install at this clone.
#
# Prints the venv path as its last line of stdout and writes it to .evp/venv-path.
# Override the location with EVP_VENV, the cache with EVP_CACHE or XDG_CACHE_HOME.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${EVP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/evp}"

python="$(command -v python3.11 || command -v python3 || true)"
if [[ -z "$python" ]]; then
    echo "bootstrap: python3.11 (or python3 >= 3.11) is required and was not found on PATH" >&2
    exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "bootstrap: $python is Python $("$python" -c 'import platform; print(platform.python_version())'); evp needs 3.11 or newer" >&2
    exit 1
fi
if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
    echo "bootstrap: $python cannot create virtual environments; install them with: sudo apt-get install -y python3-venv" >&2
    exit 1
fi

# Every dependency is pinned, with its hashes, in platform/requirements.lock (`make lock`
# writes it from pyproject.toml). The venv is keyed by that file, so editing entry points or
# tool settings does not trigger a multi-gigabyte reinstall, and a changed lock gets a fresh venv.
lock="$repo/platform/requirements.lock"
if [[ ! -f "$lock" ]]; then
    echo "bootstrap: $lock is missing; write it with: make lock" >&2
    exit 1
fi
digest="$(sha256sum "$lock" | cut -c1-12)"
venv="${EVP_VENV:-$cache/venv-$digest}"
stamp="$venv/.evp-installed"

if [[ ! -f "$stamp" ]]; then
    # No stamp: a new venv, or an earlier install that did not finish. pip is idempotent,
    # so finishing it is the same as starting it.
    echo "bootstrap: installing evp and its dependencies into $venv (first run: several minutes)" >&2
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel >&2
    # --require-hashes: a package whose bytes differ from the locked hash is refused.
    "$venv/bin/python" -m pip install -q --require-hashes -r "$lock" >&2
    "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$repo" >&2
    echo "$repo/pyproject.toml $digest" > "$stamp"
else
    # Dependencies are already there; point the editable install at this clone.
    "$venv/bin/python" -m pip install -qq -e "$repo" --no-deps --no-build-isolation >&2
fi

# An in-tree build leaves evp.egg-info in the clone; Python would read its (possibly stale)
# entry points before the venv's, whenever it runs with the clone as its working directory.
rm -rf "$repo/evp.egg-info"

mkdir -p "$repo/.evp"
touch "$repo/.evp/.evp-state"  # ours: `services.py clean` may delete it
echo "$venv" > "$repo/.evp/venv-path"
echo "$venv"
