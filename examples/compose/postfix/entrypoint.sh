#!/bin/sh
# Configure Postfix from MX_HOSTNAME and MAIL_DOMAINS, then run it in the
# foreground (Postfix >= 3.3), so that the engine's SIGTERM stops it.
set -eu
: "${MX_HOSTNAME:?set MX_HOSTNAME}" "${MAIL_DOMAINS:?set MAIL_DOMAINS}"
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
# No chroot: `postfix start-fg` does not populate one, and the container
# is the confinement.
postconf -F '*/*/chroot = n'
mkdir -p /var/mail/vhosts && chown 5000:5000 /var/mail/vhosts
exec postfix start-fg
