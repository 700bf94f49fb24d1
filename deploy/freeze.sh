#!/usr/bin/env bash
# Write deploy/constraints.txt from the virtualenv the tests passed in, so every site's image
# installs exactly those versions:  deploy/freeze.sh [.venv]
set -euo pipefail
venv=${1:-.venv}
cd "$(dirname "$0")/.."
{
  echo "# pip constraints: the versions 'make test' passed with (deploy/freeze.sh)"
  "$venv/bin/python" -m pip freeze --exclude-editable | grep -v '^-e ' | grep -iv '^fedrag-app' | sed -E 's/^([^=]+==[^+]+)\+.*$/\1/'
} > deploy/constraints.txt
echo "wrote deploy/constraints.txt ($(grep -vc '^#' deploy/constraints.txt) packages)"
