#!/bin/sh
# The one way an environment is installed, by the local runner (.venvs/<image>) and by the
# image build alike:  install-wheels.sh PYTHON WHEELHOUSE LIST
# LIST (in WHEELHOUSE) names one wheel per line with its sha256: exactly the files of the
# lock, installed offline, without resolving, each checked against its hash.
set -eu
python="$1"
cd "$2"
# Nothing from pip's configuration (indexes, find-links, constraints) takes part.
export PIP_CONFIG_FILE=/dev/null
unset PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CONSTRAINT PIP_REQUIRE_VIRTUALENV
exec "$python" -m pip install --no-index --no-deps --require-hashes --no-cache-dir \
    --disable-pip-version-check --no-warn-script-location --progress-bar off -r "$3"
