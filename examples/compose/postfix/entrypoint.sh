#!/bin/sh
# Configure Postfix from MX_HOSTNAME, MAIL_DOMAINS and SMTPD_LISTEN, then
# run it in the foreground (Postfix >= 3.3), so that the engine's SIGTERM
# stops it.
set -eu
: "${MX_HOSTNAME:?set MX_HOSTNAME}" "${MAIL_DOMAINS:?set MAIL_DOMAINS}"
listen=${SMTPD_LISTEN:-127.0.0.1:10025}
case "$listen" in
  127.*:*) ;;
  *) echo "entrypoint: SMTPD_LISTEN must be a 127.x.x.x:PORT address, got $listen" >&2; exit 2 ;;
esac
client=${listen%:*}     # smtpguard (host networking) connects from this loopback address
domains=$(echo "$MAIL_DOMAINS" | tr ',' ' ')

# Mailboxes: postmaster@ and abuse@ of every domain (RFC 5321 §4.5.1,
# RFC 2142), plus the lines of /etc/postfix/vmailbox.local if mounted
# ("user@example.com example.com/user/", a trailing / is a Maildir).
# Any other recipient is refused at RCPT, and smtpguard passes that 550 on.
{
  for d in $domains; do
    for user in postmaster abuse; do echo "$user@$d $d/$user/"; done
  done
  if [ -f /etc/postfix/vmailbox.local ]; then cat /etc/postfix/vmailbox.local; fi
} >/etc/postfix/vmailbox

# mynetworks is empty: after XCLIENT the real client is judged, and
# smtpguard's own address must make no one a trusted relay.
postconf -e \
  "myhostname = $MX_HOSTNAME" \
  "mydestination = localhost" \
  "mynetworks =" \
  "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination" \
  "inet_interfaces = loopback-only" \
  "virtual_mailbox_domains = $domains" \
  "virtual_mailbox_base = /var/mail/vhosts" \
  "virtual_mailbox_maps = texthash:/etc/postfix/vmailbox" \
  "virtual_uid_maps = static:5000" \
  "virtual_gid_maps = static:5000" \
  "alias_maps =" "alias_database =" \
  "maillog_file = /dev/stdout"

# Postfix's own :25 listener goes (smtpguard owns port 25); the only smtpd
# listens on loopback for smtpguard alone:
#  - XCLIENT from smtpguard's address only, so that Postfix's logs, checks
#    and Received headers see the real client ([upstream] xclient = true);
#  - no per-client limits: every connection is smtpguard's, which enforces
#    its own per-client limits;
#  - no local header rewriting: smtpguard's loopback address would make
#    every stranger's message a local submission (a From:, Date: and
#    Message-Id: added, unqualified header addresses rewritten).
postconf -M# smtp/inet
postconf -M "$listen/inet=$listen inet n - n - - smtpd"
postconf -P "$listen/inet/smtpd_authorized_xclient_hosts=$client" \
            "$listen/inet/smtpd_client_connection_count_limit=0" \
            "$listen/inet/smtpd_client_connection_rate_limit=0" \
            "$listen/inet/smtpd_hard_error_limit=1000" \
            "$listen/inet/local_header_rewrite_clients="
# No chroot: `postfix start-fg` does not populate one, and the container
# is the confinement.
postconf -F '*/*/chroot = n'
mkdir -p /var/mail/vhosts && chown 5000:5000 /var/mail/vhosts
exec postfix start-fg
