#!/bin/bash
# On the GPU machine: stash or install FlashAttention-4 carried by bench/device/fa4_pack.sh.
#
#   bash bench/device/fa4_install.sh          # call 1 (carry .fa4a): stash the first half
#   source bench/device/fa4_install.sh        # call 2 (carry .fa4b): join, install into /tmp/site,
#                                             #   export PYTHONPATH; fails if call 1's half is gone
set -eu
STASH=/tmp/fa4_stash
SITE=${FA4_SITE:-/tmp/site}
mkdir -p "$STASH"
if [ -d .fa4a ]; then
    (cd .fa4a && sha256sum -c --quiet SHA256SUMS)
    cp .fa4a/cu13libs.tar.xz.part00 "$STASH/"
    echo "fa4: first half stashed in $STASH"
fi
if [ -d .fa4b ]; then
    (cd .fa4b && sha256sum -c --quiet SHA256SUMS)
    if [ ! -f "$STASH/cu13libs.tar.xz.part00" ]; then
        echo "fa4: the first half is not on this machine (released between calls?): carry .fa4a first" >&2
        set +eu  # sourced: leave the caller's shell options as they were
        return 1 2>/dev/null || exit 1
    fi
    mkdir -p "$SITE"
    # wheels first: pip --target --upgrade replaces whole top-level folders (nvidia_cutlass_dsl/),
    # so the compiler library is unpacked into that folder afterwards
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .fa4b/wheels/*.whl
    cat "$STASH/cu13libs.tar.xz.part00" .fa4b/cu13libs.tar.xz.part01 | xz -d | tar -x -C "$SITE"
    # the nvidia-cutlass-dsl wheel puts dsl_packages/ (the `cutlass` package) on sys.path through a
    # .pth file, which Python reads only in site-packages folders, not in PYTHONPATH ones
    export PYTHONPATH="$SITE/nvidia_cutlass_dsl/dsl_packages:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    python3 -c "import flash_attn.cute, cutlass; print('fa4: flash_attn.cute', flash_attn.cute.__file__)"
fi
set +eu
