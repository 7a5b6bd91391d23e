#!/bin/sh
# The one way an image's Python environment is installed, used both by the
# Dockerfiles and by the local runner's virtual environments:
#   install-requirements.sh PYTHON IMAGE_DIR
# requirements.txt is installed with its dependencies; requirements-nodeps.txt
# (when present) holds packages whose declared dependencies cannot be honoured
# on this stack (unsloth asks for xformers and CUDA triton) and is installed
# with --no-deps after everything they really need is in place.
set -eu
python="$1"
dir="$2"
"$python" -m pip install --quiet -r "$dir/requirements.txt"
if [ -f "$dir/requirements-nodeps.txt" ]; then
    "$python" -m pip install --quiet --no-deps -r "$dir/requirements-nodeps.txt"
fi
# PyPI's torchvision breaks `import transformers` next to the CPU build of torch.
"$python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
