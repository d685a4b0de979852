#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with what the lent GPU machine's image lacks, for eval/gpu_check.sh to install there with
# no network. The image (device tool's KINDS.md, 2026-11) has transformers 5.17 and vtr needs >= 5.20; its
# huggingface_hub 1.33, tokenizers 0.23.2 and safetensors 0.8.0 meet transformers 5.24's requirements, so one wheel
# (about 13 MiB of the call's 64) is enough. flash-attn has no binary wheel on PyPI: flash_attention_2 is timed only
# where the image has it. Run from the repository root, then carry .whl: bash eval/gpu_wheels.sh
set -euo pipefail
TRANSFORMERS=${TRANSFORMERS:-5.24.0}
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "transformers==$TRANSFORMERS"
unzip -p .whl/transformers-"$TRANSFORMERS"-*.whl '*/METADATA' | grep '^Requires-Dist' | grep -v extra
du -sh .whl
