#!/bin/sh
# edgesync exec handler (docs/PROTOCOL.md §3.8, §5.2): applies a desired "setpoint".
#
#   [[desired.handler]]
#   keys = "setpoint"
#   type = "exec"
#   command = ["/usr/local/lib/edgesync/setpoint.sh", "/var/lib/edgesync/setpoint"]
#
# The agent runs it without a shell, with the value as compact JSON in $EDGESYNC_VALUE (and
# on stdin), the key in $EDGESYNC_KEY and the document's version in $EDGESYNC_VERSION.
# Exit 0: applied, and what it prints (JSON) is the value actually applied, reported back to
# the cloud. Any other exit: the key is "failed" with the last line of stderr as the error.
set -eu
target="${1:?usage: setpoint.sh FILE}"
value="${EDGESYNC_VALUE:?EDGESYNC_VALUE not set: run by edgesync}"

# A number from 5 to 30 (JSON numbers: optional minus, digits, optional fraction).
case "$value" in
  '' | *[!0-9.-]* | *.*.* | -*-* | ?*-*) echo "setpoint: expected a number, got $value" >&2; exit 1 ;;
esac
if ! awk -v v="$value" 'BEGIN { exit !(v + 0 >= 5 && v + 0 <= 30) }'; then
  echo "setpoint: $value is out of range (5 to 30)" >&2
  exit 1
fi

# Write it atomically where the device reads it (here: a file; on a real device perhaps a
# sysfs attribute or a call to the controller).
printf '%s\n' "$value" >"$target.tmp"
mv "$target.tmp" "$target"
# The value applied, as JSON.
printf '%s\n' "$value"
