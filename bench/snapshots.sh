#!/usr/bin/env bash
# Snapshots of commits for an A/B on the device machine: `git archive REV` unpacked under
# .snap/NAME (NAME = the revision with / replaced by -), nothing installed. The device tool copies
# the working tree but not .git, so carry the snapshots (they are ignored: .git/info/exclude):
#
#   bash bench/snapshots.sh main wip/qstage      # -> .snap/main .snap/wip-qstage
#   device run, carry [".snap"]:
#   STEPS=ab AB_TREES=".snap/main .snap/wip-qstage" bash bench/device_session.sh
set -eu
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ $# -gt 0 ] || { echo "usage: bench/snapshots.sh REV [REV...]" >&2; exit 2; }
grep -qx ".snap/" .git/info/exclude 2>/dev/null || echo ".snap/" >> .git/info/exclude
for rev in "$@"; do
  name=${rev//\//-}
  git rev-parse --verify --quiet "$rev^{commit}" > /dev/null || { echo "no commit $rev" >&2; exit 2; }
  rm -rf ".snap/$name" && mkdir -p ".snap/$name"
  git archive "$rev" | tar -x -C ".snap/$name"
  echo ".snap/$name  $(git rev-parse --short "$rev")"
done
