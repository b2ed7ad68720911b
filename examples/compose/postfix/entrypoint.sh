#!/bin/sh
# Configure Postfix from MX_HOSTNAME and MAIL_DOMAINS, then run it in the
# foreground (Postfix >= 3.3), so that the engine's SIGTERM stops it.
set -eu
: "${MX_HOSTNAME:?set MX_HOSTNAME}" "${MAIL_DOMAINS:?set MAIL_DOMAINS}"
domains=$(echo "$MAIL_DOMAINS" | tr ',' ' ')
postconf -e \
  "myhostname = $MX_HOSTNAME" \
  "mydestination = localhost" \
  "mynetworks =" \
  "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination" \
  "inet_interfaces = loopback-only" \
  "virtual_mailbox_domains = $domains" \
  "virtual_mailbox_base = /var/mail/vhosts" \
  "virtual_mailbox_maps = regexp:/etc/postfix/vmailbox" \
  "virtual_uid_maps = static:5000" \
  "virtual_gid_maps = static:5000" \
  "maillog_file = /dev/stdout"
mkdir -p /var/mail/vhosts && chown 5000:5000 /var/mail/vhosts
exec postfix start-fg
