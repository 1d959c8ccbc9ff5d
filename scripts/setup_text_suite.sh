#!/bin/sh
# Install the Debian packages the offline text suite is built from (cmerge.suites.text_data).
#
#   scripts/setup_text_suite.sh            as root: install what is missing; otherwise:
#                                          print the commands that would, and exit 1
#   scripts/setup_text_suite.sh --dry-run  only print what is missing (any user)
#   scripts/setup_text_suite.sh --list     print every Debian package the suite reads, one per line
#
# Quiet and exit 0 when everything is in place, so it is safe to run before every job.
#
# Two kinds of package:
# - data packages installed with apt (WordNet, the fortune databases, unicode-data);
# - three CRAN data packages (r-cran-*), of which only the files are needed: installing
#   them with apt would pull in R, so they are fetched with `apt-get download` and unpacked
#   with `dpkg-deb -x` into the R library folder cmerge reads: $CMERGE_R_LIBRARY, else
#   ${CMERGE_CACHE:-~/.cache/cmerge}/debian/usr/lib/R/site-library. Run Python with the
#   same CMERGE_CACHE / CMERGE_R_LIBRARY (and HOME) as this script.
#
# The package lists are not written here: they come from src/cmerge/suites/sources/packages.py
# (run with python3; standard library only), the same list cmerge's error messages name.
set -eu

PACKAGES_PY="$(dirname "$0")/../src/cmerge/suites/sources/packages.py"
read_list() {
    python3 "$PACKAGES_PY" "$1" || {
        echo "setup_text_suite: cannot read the package list from $PACKAGES_PY (needs python3)" >&2
        exit 2
    }
}
APT_PACKAGES="$(read_list apt)"
R_PACKAGES="$(read_list r)"   # Debian names: r-cran-<name>
CACHE_ROOT="${CMERGE_CACHE:-${HOME:-/root}/.cache/cmerge}"
R_LIBRARY="${CMERGE_R_LIBRARY:-$CACHE_ROOT/debian/usr/lib/R/site-library}"

dry_run=0
case "${1:-}" in
    --dry-run) dry_run=1 ;;
    --list) read_list all | tr ' ' '\n'; exit 0 ;;
    "") ;;
    *) echo "usage: $0 [--dry-run|--list]" >&2; exit 2 ;;
esac

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

missing_apt=""
for p in $APT_PACKAGES; do
    installed "$p" || missing_apt="$missing_apt $p"
done
missing_r=""
for p in $R_PACKAGES; do
    [ -f "$R_LIBRARY/$p/data/Rdata.rdx" ] || missing_r="$missing_r $p"
done
missing_apt="${missing_apt# }"
missing_r="${missing_r# }"
[ -z "$missing_apt" ] && [ -z "$missing_r" ] && exit 0

print_plan() {
    echo "The cmerge text suite needs these Debian packages (apt-get install needs root):"
    [ -n "$missing_apt" ] && echo "  apt-get update && apt-get install -y --no-install-recommends $missing_apt"
    for p in $missing_r; do
        echo "  apt-get download r-cran-$p && dpkg-deb -x r-cran-${p}_*.deb /tmp/r-cran-$p" \
             "&& mkdir -p '$R_LIBRARY' && cp -r /tmp/r-cran-$p/usr/lib/R/site-library/$p '$R_LIBRARY/'"
    done
    echo "(or run $0 as root, which does exactly this)"
}

if [ "$dry_run" = 1 ]; then
    print_plan
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    print_plan >&2
    exit 1
fi

work="$(mktemp -d)"
log="$work/log"
trap 'rm -rf "$work"' EXIT
run() {   # run quietly; on failure show what it said
    if ! "$@" >>"$log" 2>&1; then
        echo "setup_text_suite: failed: $*" >&2
        cat "$log" >&2
        exit 1
    fi
}

run apt-get update -qq
if [ -n "$missing_apt" ]; then
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing_apt
fi
if [ -n "$missing_r" ]; then
    mkdir -p "$work/debs" "$R_LIBRARY"
    # apt drops root to the _apt user for downloads; let it write there.
    chmod 755 "$work"
    if id _apt >/dev/null 2>&1; then chown _apt "$work/debs"; fi
    for p in $missing_r; do
        (cd "$work/debs" && run apt-get download -qq "r-cran-$p")
        run dpkg-deb -x "$work"/debs/r-cran-"$p"_*.deb "$work/root"
        rm -rf "${R_LIBRARY:?}/$p"
        cp -r "$work/root/usr/lib/R/site-library/$p" "$R_LIBRARY/"
    done
fi
installed_now="$missing_apt"
for p in $missing_r; do installed_now="$installed_now r-cran-$p"; done
echo "setup_text_suite: installed ${installed_now# }${missing_r:+ (R data in $R_LIBRARY)}"
