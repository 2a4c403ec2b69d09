#!/usr/bin/env bash
# Apply (or revert) the megatron-mohge patch for a Megatron-LM checkout's tag.
#
#   patches/apply.sh [--check] [--revert] [--force] [--tag TAG] MEGATRON_LM_DIR
#
# One patch per supported tag: patches/megatron-lm-<TAG>.patch. The tag is found as follows:
# for a git checkout, the supported tag HEAD carries (a checkout at another tag is refused;
# one without tag information falls back to the version file); for an exported tree, the
# supported tag on the MAJOR.MINOR line of megatron/core/package_info.py (a tag's version file
# may be a patch release ahead: core_v0.19.0 says 0.19.1). --tag TAG names the patch and skips
# detection; --force skips the version check and takes the patch of the version file's
# MAJOR.MINOR line, else the newest (it may still not apply). --check only reports whether the
# patch would apply. Applying twice is a no-op.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() { echo "usage: $0 [--check] [--revert] [--force] [--tag TAG] MEGATRON_LM_DIR" >&2; exit 2; }
die() { echo "apply.sh: $*" >&2; exit 1; }

FORCE=0 REVERT=0 CHECK=0 DIR= TAG=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --force) FORCE=1 ;;
    --revert|-R) REVERT=1 ;;
    --check) CHECK=1 ;;
    --tag) [[ $# -ge 2 ]] || usage; TAG=$2; shift ;;
    -h|--help) usage ;;
    -*) echo "apply.sh: unknown option $1" >&2; usage ;;
    *) [[ -z "$DIR" ]] || usage; DIR=$1 ;;
  esac
  shift
done
[[ -n "$DIR" ]] || usage

# Supported tags: one per patch file, oldest first.
TAGS=()
for p in "$HERE"/megatron-lm-core_v*.patch; do
  [[ -f "$p" ]] || continue
  t=${p##*/megatron-lm-}; TAGS+=("${t%.patch}")
done
[[ ${#TAGS[@]} -gt 0 ]] || die "no patches in $HERE"
mapfile -t TAGS < <(printf '%s\n' "${TAGS[@]}" | sort -V)
SUPPORTED=$(IFS=,; echo "${TAGS[*]}" | sed 's/,/, /g')

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
line() { local v=${1#core_v}; echo "${v%.*}"; }  # core_v0.19.0 / 0.19.1 -> 0.19
tag_of_line() {  # the supported tag on MAJOR.MINOR line $1, or empty
  local t
  for t in "${TAGS[@]}"; do [[ "$(line "$t")" == "$1" ]] && echo "$t"; done
  return 0
}

detect_tag() {  # sets TAG and FOUND, or dies
  local fv t
  fv=$(file_version)
  if [[ "$(git -C "$DIR" rev-parse --show-toplevel 2>/dev/null)" == "$DIR" ]]; then
    for t in "${TAGS[@]}"; do
      if git -C "$DIR" tag --points-at HEAD 2>/dev/null | grep -qx "$t"; then
        TAG=$t FOUND="git tag $t"
      fi
    done
    if [[ -z "$TAG" && -n "$(git -C "$DIR" tag -l 'core_v*' 2>/dev/null | head -n1)" ]]; then
      die "$DIR is at $(git -C "$DIR" describe --tags --always 2>/dev/null), not a supported tag ($SUPPORTED). Check out one (git -C $DIR checkout ${TAGS[-1]}) or pass --force."
    fi
  fi
  if [[ -z "$TAG" ]]; then
    TAG=$(tag_of_line "$(line "${fv:-none}")")
    [[ -n "$TAG" ]] || die "$DIR has megatron-core version '${fv:-unknown}' (megatron/core/package_info.py): no patch for it (supported tags: $SUPPORTED). See patches/README.md, or pass --force."
    FOUND="package_info.py $fv"
  fi
  [[ -z "$fv" || "$(line "$fv")" == "$(line "$TAG")" ]] || die "$DIR: the tag says $TAG but package_info.py says $fv"
}

FOUND=
if [[ -n "$TAG" ]]; then
  echo "apply.sh: --tag $TAG: skipping the version check (found '$(file_version)')"
elif [[ "$FORCE" == 1 ]]; then
  fv=$(file_version)
  TAG=$(tag_of_line "$(line "${fv:-none}")")
  TAG=${TAG:-${TAGS[-1]}}
  echo "apply.sh: --force: skipping the version check (found '$fv'); using the $TAG patch"
else
  detect_tag
  echo "apply.sh: $DIR is Megatron-LM $TAG ($FOUND)"
fi
PATCH="$HERE/megatron-lm-$TAG.patch"
[[ -f "$PATCH" ]] || die "no patch for $TAG ($PATCH); supported tags: $SUPPORTED"

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
[[ "$CHECK" == 1 ]] && { echo "apply.sh: $(basename "$PATCH") applies cleanly"; exit 0; }
"${GIT_APPLY[@]}" "$PATCH"
echo "apply.sh: applied $(basename "$PATCH") to $DIR (revert with: $0 --revert $DIR)"
