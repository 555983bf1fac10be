#!/bin/sh
# Build /usr/lib/meshlet for the target interpreter. Runs INSIDE a Debian 12 rootfs (so the
# interpreter is bookworm's /usr/bin/python3 = 3.11, and pystemd compiles against its
# libsystemd); dev/package starts it with systemd-nspawn. Mounted by dev/package:
#   /mnt/src     the project at one git commit (git archive)
#   /mnt/lock    packaging/requirements.lock (the pinned dependency closure)
#   /mnt/wheels  cache of wheels built here (pystemd, lxml), kept between builds
#   /mnt/out     the staging tree; this writes /mnt/out/usr/lib/meshlet
set -eu
PY=/usr/bin/python3
OUT=/mnt/out/usr/lib/meshlet
TOOLS=/tmp/tools

$PY -m venv "$TOOLS"
"$TOOLS/bin/pip" install -q pip==25.3 setuptools==80.9.0 wheel==0.45.1

# Built here, once, for this interpreter (then cached in /mnt/wheels):
# - pystemd publishes only an sdist;
# - lxml (pystemd needs it) is built against Debian's libxml2/libxslt, not the copies its
#   PyPI wheels carry, so their security updates reach meshlet with the system's.
# -g0 and a strip keep build paths out of the binaries: a rebuild gives the same bytes.
build_wheel() {  # NAME: compile NAME==<locked version> into /mnt/wheels unless it is there
    v=$(sed -n "s/^$1==//p" /mnt/lock)
    ls /mnt/wheels/"$1"-"$v"-*.whl >/dev/null 2>&1 && return 0
    rm -rf /tmp/bw && mkdir -p /tmp/bw
    # --no-cache-dir: never a wheel some other interpreter built into pip's (shared) cache.
    CFLAGS="-O2 -g0" "$TOOLS/bin/pip" wheel -q --no-cache-dir --no-deps --no-binary "$1" \
        -w /tmp/bw "$1==$v"
    mv /tmp/bw/"$1"-"$v"-*.whl /mnt/wheels/
}
lxml_v=$(sed -n 's/^lxml==//p' /mnt/lock)
# (the -dev packages to build it; the libraries alone to import it in the check below)
if ! ls /mnt/wheels/lxml-"$lxml_v"-*.whl >/dev/null 2>&1; then
    xml_debs="libxml2-dev libxslt1-dev zlib1g-dev"
else
    xml_debs="libxml2 libxslt1.1"
fi
# shellcheck disable=SC2086
if ! dpkg -s $xml_debs >/dev/null 2>&1; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $xml_debs >/dev/null
fi
build_wheel pystemd
build_wheel lxml

# The project itself, from the commit (build isolation off: pinned setuptools above).
rm -rf /tmp/proj /tmp/proj-src && cp -a /mnt/src /tmp/proj-src
"$TOOLS/bin/pip" wheel -q --no-deps --no-build-isolation -w /tmp/proj /tmp/proj-src

rm -rf "$OUT" && mkdir -p "$OUT"
# The wheels built above by path (pip would rank PyPI's manylinux lxml above a local
# linux_x86_64 one), the rest from PyPI: wheels where there are, else built (sdnotify).
grep -v -e '^pystemd==' -e '^lxml==' /mnt/lock > /tmp/lock-pypi
"$TOOLS/bin/pip" install -q --no-deps --no-compile --prefer-binary --target "$OUT" \
    -r /tmp/lock-pypi /mnt/wheels/pystemd-"$(sed -n 's/^pystemd==//p' /mnt/lock)"-*.whl \
    /mnt/wheels/lxml-"$lxml_v"-*.whl /tmp/proj/meshlet-*.whl

# What the installed tree must not carry: console scripts (our launchers replace them),
# bytecode (compiled by the postinst for the installed interpreter), build paths.
rm -rf "$OUT/bin"
find "$OUT" -name __pycache__ -prune -exec rm -rf {} +
find "$OUT" -name direct_url.json -path '*.dist-info/*' -delete
find "$OUT" -name '*.dist-info' -exec sh -c 'sed -i "/^\.\.\/\.\.\/bin\//d; /__pycache__/d; /direct_url.json/d" "$1/RECORD"' _ {} \;
# Not needed to run: the libraries' own tests and dev tools, C/Cython sources and headers.
find "$OUT" -mindepth 2 -maxdepth 2 -type d \( -name tests -o -name _tests -o -name _tools \
    -o -name includes -o -name .agents \) -prune -exec rm -rf {} +
find "$OUT" -type f \( -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' -o -name '*.c' \
    -o -name '*.h' \) -delete
# A module run with `python -m` keeps its shebang only as a comment (as dh_python3 would).
find "$OUT" -type f -name '*.py' -not -perm -u+x -exec sed -i '1s/^#!.*$/#/' {} +
# Extension modules without their symbol tables and debug info (a third of the size). The
# libraries auditwheel vendored into *.libs/ are left alone: patchelf'd files break if stripped.
find "$OUT" -name '*.so' -not -path '*.libs/*' -exec strip --strip-unneeded {} +
chmod -R u=rwX,go=rX "$OUT"

"$PY" -I -S -B -c "import sys; sys.path.insert(0, '$OUT')
import lxml.etree
assert lxml.etree.LIBXML_VERSION == lxml.etree.LIBXML_COMPILED_VERSION, 'lxml: not the system libxml2'
assert lxml.etree.__file__.startswith('$OUT'), lxml.etree.__file__
import meshletd.__main__, meshletctl.cli, pystemd.run, lxml.etree, nacl.public, pydantic_core, atproto
# The lexicons come in the project's wheel, as package data (meshletd/lexicons).
from meshletd.atproto.lexicon import LEXICON_DIR, default_lexicons
assert str(LEXICON_DIR).startswith('$OUT/meshletd/lexicons') and default_lexicons().docs, LEXICON_DIR
print('bundle ok:', sys.version.split()[0])"
