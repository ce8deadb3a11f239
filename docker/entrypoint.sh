#!/bin/bash
# podbay-entrypoint: start an unprivileged sshd for the project container.
#
# Runs as the image's user `dev` (podbay adds --cap-drop ALL and no-new-privileges).
# Inputs (the contract with podbay's engine):
#   PODBAY_SSH_PORT               required, 1-65535: the port sshd listens on
#   PODBAY_SSH_LISTEN             optional, default 127.0.0.1 (0.0.0.0 in bridge-network mode,
#                                 where the port is published on the host's 127.0.0.1 only)
#   /run/podbay/authorized_keys   required, read-only bind mount: one or more public keys
#   PODBAY_GIT_NAME, PODBAY_GIT_EMAIL   optional: git's user.name and user.email
#   /run/podbay/git-credentials   optional, read-only: git credential-store format
#   /run/podbay/ssh_host_ed25519_key  optional, read-only: the sshd host key podbay made (and
#                                 pinned in its known_hosts); without it, one is made once
#                                 and kept in the volume
#   /home/dev/.podbay             volume: the sshd host key in use, sshd's config and pid file
# Secrets never come through the environment.
#
# With arguments, runs them instead of sshd (`docker run IMAGE go version`).
#
# Each missing or invalid input ends the container with status 2 and one line on stderr.
set -euo pipefail

PROG=podbay-entrypoint
RUN_DIR=/run/podbay
KEYS_IN=$RUN_DIR/authorized_keys
CREDENTIALS=$RUN_DIR/git-credentials
GIVEN_HOST_KEY=$RUN_DIR/ssh_host_ed25519_key
USER_NAME=dev

die() {
  printf '%s: %s\n' "$PROG" "$*" >&2
  exit 2
}
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }

if [ "$#" -gt 0 ]; then
  exec "$@"
fi

# --- who we are ----------------------------------------------------------------------------
uid=$(id -u)
dev_uid=$(id -u "$USER_NAME" 2>/dev/null) || die "this image has no user $USER_NAME (build it from podbay's Dockerfile.base)"
if [ "$uid" = 0 ]; then
  die "running as root, but sshd only serves user $USER_NAME: run the container with --user $dev_uid (or no --user at all)"
fi
if [ "$uid" != "$dev_uid" ]; then
  die "running as uid $uid, but sshd only serves user $USER_NAME (uid $dev_uid): run the container with --user $dev_uid, or rebuild the image with --build-arg DEV_UID=$uid"
fi
HOME=$(getent passwd "$USER_NAME" | cut -d: -f6)
export HOME
STATE=$HOME/.podbay
HOST_KEY=$STATE/ssh_host_ed25519_key
CONFIG=$STATE/sshd_config

# --- inputs --------------------------------------------------------------------------------
port=${PODBAY_SSH_PORT:-}
[ -n "$port" ] || die "PODBAY_SSH_PORT is not set (podbay passes the project's SSH port; set -e PODBAY_SSH_PORT=<1-65535>)"
case $port in
  *[!0-9]* | 0*) die "PODBAY_SSH_PORT='$port' is not a port number (expected 1-65535 without leading zeros)" ;;
esac
if [ "${#port}" -gt 5 ] || [ "$port" -gt 65535 ]; then
  die "PODBAY_SSH_PORT=$port is out of range (expected 1-65535)"
fi

listen=${PODBAY_SSH_LISTEN:-127.0.0.1}
case $listen in
  *[!0-9A-Za-z.:_-]*) die "PODBAY_SSH_LISTEN='$listen' is not an address (expected e.g. 127.0.0.1, 0.0.0.0 or ::1)" ;;
esac

[ -e "$KEYS_IN" ] || die "$KEYS_IN is missing (podbay bind-mounts the allowed public keys there: -v KEYFILE:$KEYS_IN:ro)"
[ -f "$KEYS_IN" ] || die "$KEYS_IN is not a regular file (mount the public key file itself, not a directory)"
[ -r "$KEYS_IN" ] || die "$KEYS_IN is not readable by uid $uid (make the host file readable, e.g. chmod 644)"
nkeys=$(ssh-keygen -l -f "$KEYS_IN" 2>/dev/null | wc -l) || nkeys=0
[ "$nkeys" -gt 0 ] || die "$KEYS_IN holds no valid public key (expected lines like 'ssh-ed25519 AAAA... comment')"

[ -d "$STATE" ] || die "$STATE is missing (it is the project's volume mount point; use an image built from podbay's Dockerfile.base)"
if ! [ -w "$STATE" ] || ! [ -x "$STATE" ]; then
  die "$STATE is not writable by uid $uid (owner: $(stat -c %u:%g "$STATE")): the volume must belong to the container user; remove it and let podbay create it anew, or chown it to $uid"
fi

# --- authorized keys -----------------------------------------------------------------------
umask 077
mkdir -p "$HOME/.ssh"
chmod 700 "$HOME/.ssh"
tmp=$HOME/.ssh/authorized_keys.tmp
cat "$KEYS_IN" >"$tmp"
chmod 600 "$tmp"
mv -f "$tmp" "$HOME/.ssh/authorized_keys"

# --- host key: podbay's, or made once and kept in the volume ----------------------------------
if [ -e "$GIVEN_HOST_KEY" ]; then
  # Copied, not used in place: sshd wants a key file of its own user that nobody else reads.
  [ -r "$GIVEN_HOST_KEY" ] || die "$GIVEN_HOST_KEY is not readable by uid $uid (podbay chowns it to the container user)"
  ssh-keygen -y -f "$GIVEN_HOST_KEY" >"$HOST_KEY.new.pub" 2>/dev/null ||
    die "$GIVEN_HOST_KEY is not a valid private key (rebuild the project after removing it)"
  cat "$GIVEN_HOST_KEY" >"$HOST_KEY.new"
  chmod 600 "$HOST_KEY.new"
  mv -f "$HOST_KEY.new.pub" "$HOST_KEY.pub"
  mv -f "$HOST_KEY.new" "$HOST_KEY"
elif [ -e "$HOST_KEY" ] && ! ssh-keygen -y -f "$HOST_KEY" >/dev/null 2>&1; then
  bad=$HOST_KEY.broken-$(date +%Y%m%d%H%M%S)
  warn "host key $HOST_KEY is unreadable or corrupt; moved it to $bad and making a new one (clients will see a changed host key)"
  mv -f "$HOST_KEY" "$bad"
  rm -f "$HOST_KEY.pub"
fi
if ! [ -e "$HOST_KEY" ]; then
  rm -f "$HOST_KEY.new" "$HOST_KEY.new.pub"
  ssh-keygen -q -t ed25519 -N '' -C "podbay-host-key" -f "$HOST_KEY.new" ||
    die "could not create a host key in $STATE (ssh-keygen failed)"
  mv -f "$HOST_KEY.new.pub" "$HOST_KEY.pub"
  mv -f "$HOST_KEY.new" "$HOST_KEY"
  printf '%s: created host key %s\n' "$PROG" "$(ssh-keygen -l -f "$HOST_KEY.pub")" >&2
elif ! [ -s "$HOST_KEY.pub" ]; then
  ssh-keygen -y -f "$HOST_KEY" >"$HOST_KEY.pub"
fi
chmod 600 "$HOST_KEY"

# --- git -----------------------------------------------------------------------------------
if [ -n "${PODBAY_GIT_NAME:-}" ]; then
  git config --global user.name "$PODBAY_GIT_NAME"
fi
if [ -n "${PODBAY_GIT_EMAIL:-}" ]; then
  git config --global user.email "$PODBAY_GIT_EMAIL"
fi
if [ -e "$CREDENTIALS" ]; then
  if [ -r "$CREDENTIALS" ]; then
    # credential-store, but answering only "get": the file is read-only, and a plain
    # `store --file=...` helper would print "fatal: unable to get credential storage lock"
    # after every authenticated push or fetch (git asks each helper to store what worked).
    git config --global credential.helper \
      "!f() { if [ \"\$1\" = get ]; then git credential-store --file=$CREDENTIALS get; else cat >/dev/null; fi; }; f"
  else
    warn "$CREDENTIALS is not readable by uid $uid; git will ask for credentials"
  fi
fi

# --- sshd ----------------------------------------------------------------------------------
# The container's environment (PATH, LANG, toolchain variables set by stack images...) is
# handed to SSH sessions, which otherwise start from sshd's bare defaults. Per-session and
# podbay's own variables are left out (but see PODBAY_PATH).
setenv=()
add_setenv() { # add_setenv NAME VALUE: one quoted SetEnv argument; values with control characters are skipped
  local value=$2
  case $value in *[[:cntrl:]]*) return 0 ;; esac
  value=${value//\\/\\\\}
  value=${value//\"/\\\"}
  setenv+=("\"$1=$value\"")
}
while IFS= read -r name; do
  case $name in
    PODBAY_* | HOME | USER | LOGNAME | SHELL | PWD | OLDPWD | SHLVL | HOSTNAME | TERM | _ | MAIL) continue ;;
  esac
  add_setenv "$name" "${!name-}"
done < <(compgen -e)
# Login shells get PATH reset by /etc/profile; /etc/profile.d/podbay.sh adds these back.
add_setenv PODBAY_PATH "$PATH"

tmp=$CONFIG.tmp
{
  printf '# Written by podbay-entrypoint at each start; edits are lost.\n'
  printf 'Port %s\n' "$port"
  printf 'ListenAddress %s\n' "$listen"
  printf 'HostKey %s\n' "$HOST_KEY"
  printf 'PidFile %s\n' "$STATE/sshd.pid"
  cat <<'EOF'
AllowUsers dev
PermitRootLogin no
PubkeyAuthentication yes
AuthenticationMethods publickey
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitEmptyPasswords no
HostbasedAuthentication no
GSSAPIAuthentication no
KerberosAuthentication no
UsePAM no
StrictModes yes
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
StreamLocalBindUnlink yes
AllowAgentForwarding yes
GatewayPorts no
X11Forwarding no
PermitTunnel no
PermitUserEnvironment no
PrintMotd no
PrintLastLog no
UseDNS no
ClientAliveInterval 60
ClientAliveCountMax 5
LogLevel INFO
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
  if [ "${#setenv[@]}" -gt 0 ]; then
    printf 'SetEnv %s\n' "${setenv[*]}"
  fi
} >"$tmp"
mv -f "$tmp" "$CONFIG"

/usr/sbin/sshd -t -f "$CONFIG" >/dev/null 2>"$STATE/sshd-check.log" ||
  die "sshd rejects the generated config $CONFIG: $(tr '\n' ' ' <"$STATE/sshd-check.log")"
rm -f "$STATE/sshd-check.log"

printf '%s: sshd for %s on %s port %s, %s authorized key(s)\n' "$PROG" "$USER_NAME" "$listen" "$port" "$nkeys" >&2
# Sessions inherit sshd's umask: the usual 022, not the 077 used for the files above.
umask 022
exec /usr/sbin/sshd -D -e -f "$CONFIG"
