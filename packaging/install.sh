#!/bin/sh
# Installs edgesync by hand the way the Debian package and systemd/edgesync.service expect it
# (README "Use it"): the same paths, user and modes as packaging/deb.
#
#   sudo packaging/install.sh [BINARY]     # BINARY: default target/release/edgesync
#
#   /usr/bin/edgesync                      the binary (ExecStart= of the unit)
#   user and group edgesync                a system user, no login (User=, Group=)
#   /var/lib/edgesync                      the store, edgesync:edgesync 0750 (StateDirectory=)
#   /etc/edgesync/edgesync.toml            the config, root:edgesync 0640, kept if present
#   /etc/systemd/system/edgesync.service   the unit (systemd/edgesync.service)
#   /run/edgesync                          the socket's directory: made by the unit at every
#                                          start (RuntimeDirectory=), not here
#
# DESTDIR=/some/root installs into that tree instead (no user is created, nothing is
# chowned, systemd is not told): for images and for tests.
set -eu

here="$(cd "$(dirname "$0")/.." && pwd)"
binary="${1:-$here/target/release/edgesync}"
root="${DESTDIR:-}"
[ -f "$binary" ] || { echo "install.sh: no binary at $binary (cargo build --release)" >&2; exit 1; }

install -D -m 0755 "$binary" "$root/usr/bin/edgesync"
install -D -m 0644 "$here/systemd/edgesync.service" "$root/etc/systemd/system/edgesync.service"
if [ -z "$root" ]; then
  if ! getent passwd edgesync >/dev/null; then
    useradd --system --user-group --home-dir /var/lib/edgesync --no-create-home \
      --shell /usr/sbin/nologin edgesync
  fi
  owner="-o edgesync -g edgesync"
  group="-g edgesync"
else
  owner="" group=""
fi
# shellcheck disable=SC2086
install -d $owner -m 0750 "$root/var/lib/edgesync"
install -d -m 0755 "$root/etc/edgesync"
if [ ! -e "$root/etc/edgesync/edgesync.toml" ]; then
  # shellcheck disable=SC2086
  install $group -m 0640 "$here/config/edgesync.example.toml" "$root/etc/edgesync/edgesync.toml"
fi
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi

cat <<'EOF'
Installed. Next:
  1. edit /etc/edgesync/edgesync.toml (device.id, mqtt.url) and put the CA, the device
     certificate and key where it says (key: chown root:edgesync, chmod 0640)
  2. sudo runuser -u edgesync -- edgesync check-config
  3. sudo systemctl enable --now edgesync && edgesync status
EOF
