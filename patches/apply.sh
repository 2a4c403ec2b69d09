#!/usr/bin/env bash
# Apply (or revert) the megatron-mohge patch to a Megatron-LM checkout.
#
#   patches/apply.sh [--check] [--revert] [--force] MEGATRON_LM_DIR
#
# The checkout must be at tag core_v0.16.1: for a git checkout HEAD must carry the tag (a
# checkout without tag information falls back to the version file); for an exported tree
# megatron/core/package_info.py must say 0.16.1. --force skips the version check (the patch
# may still not apply). --check only reports whether it would apply. Applying twice is a no-op.
set -euo pipefail

TAG=core_v0.16.1
VERSION=0.16.1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PATCH="$HERE/megatron-lm-$TAG.patch"

usage() { echo "usage: $0 [--check] [--revert] [--force] MEGATRON_LM_DIR" >&2; exit 2; }
die() { echo "apply.sh: $*" >&2; exit 1; }

FORCE=0 REVERT=0 CHECK=0 DIR=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --force) FORCE=1 ;;
    --revert|-R) REVERT=1 ;;
    --check) CHECK=1 ;;
    -h|--help) usage ;;
    -*) echo "apply.sh: unknown option $1" >&2; usage ;;
    *) [[ -z "$DIR" ]] || usage; DIR=$1 ;;
  esac
  shift
done
[[ -n "$DIR" ]] || usage
[[ -f "$PATCH" ]] || die "patch not found: $PATCH"
[[ -d "$DIR" ]] || die "$DIR is not a directory"
DIR=$(cd "$DIR" && pwd)
for f in pretrain_gpt.py gpt_builders.py megatron/training/training.py; do
  [[ -f "$DIR/$f" ]] || die "$DIR does not look like a Megatron-LM checkout (no $f)"
done

file_version() {  # MAJOR.MINOR.PATCH from megatron/core/package_info.py, or empty
  local info="$DIR/megatron/core/package_info.py"
  [[ -f "$info" ]] || return 0
  local major minor patch
  major=$(sed -n 's/^MAJOR *= *\([0-9]*\).*/\1/p' "$info")
  minor=$(sed -n 's/^MINOR *= *\([0-9]*\).*/\1/p' "$info")
  patch=$(sed -n 's/^PATCH *= *\([0-9]*\).*/\1/p' "$info")
  [[ -n "$major" && -n "$minor" && -n "$patch" ]] && echo "$major.$minor.$patch"
  return 0
}

check_version() {
  local found fv
  fv=$(file_version)
  if [[ "$(git -C "$DIR" rev-parse --show-toplevel 2>/dev/null)" == "$DIR" ]]; then
    if git -C "$DIR" tag --points-at HEAD 2>/dev/null | grep -qx "$TAG"; then
      found="git tag $TAG"
    elif [[ -n "$(git -C "$DIR" tag -l 'core_v*' 2>/dev/null | head -n1)" ]]; then
      die "$DIR is at $(git -C "$DIR" describe --tags --always 2>/dev/null), not $TAG. Check out the tag (git -C $DIR checkout $TAG) or pass --force."
    fi
  fi
  if [[ -z "${found:-}" ]]; then
    [[ "$fv" == "$VERSION" ]] || die "$DIR has megatron-core version '${fv:-unknown}' (megatron/core/package_info.py), not $VERSION ($TAG). See patches/README.md for supported versions, or pass --force."
    found="package_info.py $fv"
  fi
  [[ -z "$fv" || "$fv" == "$VERSION" ]] || die "$DIR: the tag says $TAG but package_info.py says $fv"
  echo "apply.sh: $DIR is Megatron-LM $TAG ($found)"
}

if [[ "$FORCE" == 1 ]]; then
  echo "apply.sh: --force: skipping the version check (found '$(file_version)')"
else
  check_version
fi

# git apply works in plain directories too (it then behaves like patch -p1).
GIT_APPLY=(git -C "$DIR" apply --whitespace=nowarn)
if [[ "$REVERT" == 1 ]]; then
  if "${GIT_APPLY[@]}" --check "$PATCH" 2>/dev/null; then
    echo "apply.sh: not applied in $DIR; nothing to revert"; exit 0
  fi
  "${GIT_APPLY[@]}" --check -R "$PATCH" || die "the patch cannot be reverted cleanly in $DIR (files changed since it was applied?)"
  [[ "$CHECK" == 1 ]] && { echo "apply.sh: the patch can be reverted"; exit 0; }
  "${GIT_APPLY[@]}" -R "$PATCH"
  echo "apply.sh: reverted $(basename "$PATCH") in $DIR"
  exit 0
fi
if "${GIT_APPLY[@]}" --check -R "$PATCH" 2>/dev/null; then
  echo "apply.sh: already applied in $DIR"; exit 0
fi
"${GIT_APPLY[@]}" --check "$PATCH" || die "the patch does not apply to $DIR (modified files, or another Megatron-LM version)"
[[ "$CHECK" == 1 ]] && { echo "apply.sh: the patch applies cleanly"; exit 0; }
"${GIT_APPLY[@]}" "$PATCH"
echo "apply.sh: applied $(basename "$PATCH") to $DIR (revert with: $0 --revert $DIR)"
