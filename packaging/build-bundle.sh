#!/bin/sh
# Build /usr/lib/meshlet for the target interpreter. Runs INSIDE a Debian 12 rootfs (so the
# interpreter is bookworm's /usr/bin/python3 = 3.11, and pystemd compiles against its
# libsystemd); dev/package starts it with systemd-nspawn. Mounted by dev/package:
#   /mnt/src     the project at one git commit (git archive)
#   /mnt/lock    packaging/requirements.lock (the pinned dependency closure)
#   /mnt/wheels  cache of wheels built here (pystemd), kept between builds
#   /mnt/out     the staging tree; this writes /mnt/out/usr/lib/meshlet
set -eu
PY=/usr/bin/python3
OUT=/mnt/out/usr/lib/meshlet
TOOLS=/tmp/tools

$PY -m venv "$TOOLS"
"$TOOLS/bin/pip" install -q pip==25.3 setuptools==80.9.0 wheel==0.45.1

# pystemd publishes only an sdist: build its wheel once for this interpreter. -g0 and a strip
# keep build paths out of the binary, so a rebuild gives the same bytes.
ver=$(sed -n 's/^pystemd==//p' /mnt/lock)
if ! ls /mnt/wheels/pystemd-"$ver"-*.whl >/dev/null 2>&1; then
    rm -rf /tmp/pw && mkdir -p /tmp/pw
    # --no-cache-dir: never a wheel some other interpreter built into pip's (shared) cache.
    CFLAGS="-O2 -g0" "$TOOLS/bin/pip" wheel -q --no-cache-dir --no-deps --no-binary pystemd -w /tmp/pw \
        "pystemd==$ver"
    mv /tmp/pw/pystemd-"$ver"-*.whl /mnt/wheels/
fi

# The project itself, from the commit (build isolation off: pinned setuptools above).
rm -rf /tmp/proj /tmp/proj-src && cp -a /mnt/src /tmp/proj-src
"$TOOLS/bin/pip" wheel -q --no-deps --no-build-isolation -w /tmp/proj /tmp/proj-src

rm -rf "$OUT" && mkdir -p "$OUT"
# Wheels from PyPI where there are (manylinux), else built here (sdnotify: pure Python).
"$TOOLS/bin/pip" install -q --no-deps --no-compile --prefer-binary \
    --find-links /mnt/wheels --target "$OUT" -r /mnt/lock /tmp/proj/meshlet-*.whl

# What the installed tree must not carry: console scripts (our launchers replace them),
# bytecode (compiled by the postinst for the installed interpreter), build paths.
rm -rf "$OUT/bin"
find "$OUT" -name __pycache__ -prune -exec rm -rf {} +
find "$OUT" -name direct_url.json -path '*.dist-info/*' -delete
find "$OUT" -name '*.dist-info' -exec sh -c 'sed -i "/^\.\.\/\.\.\/bin\//d; /__pycache__/d; /direct_url.json/d" "$1/RECORD"' _ {} \;
# Extension modules without their symbol tables and debug info (a third of the size). The
# libraries auditwheel vendored into *.libs/ are left alone: patchelf'd files break if stripped.
find "$OUT" -name '*.so' -not -path '*.libs/*' -exec strip --strip-unneeded {} +
# meshletd reads its lexicons from beside its package (meshletd/atproto/lexicon.py).
cp -a /mnt/src/lexicons "$OUT/lexicons"
chmod -R u=rwX,go=rX "$OUT"

"$PY" -I -S -B -c "import sys; sys.path.insert(0, '$OUT')
import meshletd.__main__, meshletctl.cli, pystemd.run, nacl.public, pydantic_core, atproto
print('bundle ok:', sys.version.split()[0])"
